"""`pneumotriage model ...`: train, evaluate, export (the inference service adds `deploy` to the
same group: ``from services.inference.tools.model_cli import model; @model.command("deploy")``).

torch is imported only inside train/export (the [train] extra); evaluate needs onnxruntime only.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from services.inference.tools.cli_errors import (
    active_model_dir,
    load_checkpoint_or_fail,
    require_model_dir,
    require_torch,
    user_errors_command,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kermany224" / "train"

app = typer.Typer(no_args_is_help=True)
model = typer.Typer(name="model", help="Train, evaluate and export the pneumonia model.", no_args_is_help=True)
app.add_typer(model, name="model")
console = Console()


def staging_area() -> Path:
    """Where `model train` / `model export` write new versions: <PT_DATA_DIR>/model-staging, a
    Triton-layout repository of its own. Nothing there is served; `model deploy --model-dir` is
    the one way into the live repository (deploy/triton/model_repository)."""
    from services.core.settings import CommonSettings

    return CommonSettings().data_dir / "model-staging"


def _check_images(data: Path, n: int = 16) -> list[Path]:
    from services.inference.tools.training.sources import load_training_data

    records = load_training_data(data).records
    step = max(1, len(records) // n)
    return [r.path for r in records[::step]][:n]


@model.command("train")
@user_errors_command
def train_cmd(
    data: Path = typer.Option(
        DEFAULT_DATA,
        exists=True,
        file_okay=False,
        help="folder with NORMAL/ and PNEUMONIA/ (JPEG, PNG or DICOM), or a labeling export (labels.csv: soft"
        " labels, study = patient, split by patient automatically)",
    ),
    out: Path = typer.Option(
        None, help="repository to stage the new version in (default: <PT_DATA_DIR>/model-staging; never the live one)"
    ),
    version: int = typer.Option(0, help="version number (0: next free)"),
    checkpoint: Path = typer.Option(Path("var/model/pneumonia.pt"), help="PyTorch checkpoint (for `model export`)"),
    split_file: Path = typer.Option(None, help="patient split JSON (default: the committed training/split.json)"),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(3e-3),
    input_size: int = typer.Option(0, help="0: preprocess.INPUT_SIZE"),
    max_minutes: float = typer.Option(28.0, help="do not start an epoch that would end after this"),
    limit: int = typer.Option(0, help="use at most this many training images (smoke runs)"),
    seed: int = typer.Option(1234),
    threads: int = typer.Option(2),
    evaluate_test: bool = typer.Option(True, help="evaluate the exported ONNX on the held-out test split"),
    augment_strength: float = typer.Option(1.0, help="0: v1's augmentation; 1: + window/resolution/noise/border"),
    label_smoothing: float = typer.Option(0.05),
    ema_decay: float = typer.Option(0.998, help="0: export the last weights instead of their moving average"),
    calibration_prior: float = typer.Option(0.6, help="P(pneumonia) the calibrated probability assumes"),
    operating_sensitivity: float = typer.Option(0.98, help="operating threshold: keep this val sensitivity"),
    channels: str = typer.Option("", help="network widths, e.g. 16,32,64,96,128 (default: NetConfig's)"),
    hold_out_external: bool = typer.Option(True, help="never train on the proxy-external batches"),
    residual: bool = typer.Option(False, help="residual blocks (the second conv of each stage)"),
    members: int = typer.Option(1, help="ensemble of this many networks (seeds seed, seed+1, ...), averaged"),
    resume: bool = typer.Option(
        False, help="continue from the per-epoch checkpoints next to --checkpoint (same command and seed)"
    ),
) -> None:
    """Train on CPU, calibrate on the validation split, export ONNX into the staging area (never served
    until `model deploy`). Needs the `train` extra (PyTorch)."""
    require_torch()
    from services.inference.preprocess import INPUT_SIZE
    from services.inference.tools.training.network import NetConfig
    from services.inference.tools.training.split import SPLIT_FILE
    from services.inference.tools.training.train import TrainConfig, save_checkpoint, train

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        input_size=input_size or INPUT_SIZE,
        seed=seed,
        threads=threads,
        max_minutes=max_minutes,
        limit=limit or None,
        augment_strength=augment_strength,
        label_smoothing=label_smoothing,
        ema_decay=ema_decay,
        calibration_prior=calibration_prior,
        operating_sensitivity=operating_sensitivity,
        hold_out_external=hold_out_external,
        net=NetConfig(
            channels=tuple(int(c) for c in channels.split(",")) if channels else NetConfig().channels,
            residual=residual,
            members=members,
        ),
    )
    split_path = split_file or SPLIT_FILE
    progress_dir = checkpoint.with_name(checkpoint.name + ".epochs")  # per-epoch state of each member
    if progress_dir.exists() and not resume:
        import shutil

        shutil.rmtree(progress_dir)
    net, info = train(data, config, split_path, console, checkpoint_dir=progress_dir)
    save_checkpoint(net, info, checkpoint)
    console.print(
        f"trained in {info['train_seconds']:.0f} s, best epoch {info['best_epoch']}, val AUC {info['val']['auc']:.4f}"
    )
    split_path = Path(info.get("split_file") or split_path)  # an automatic split (export, unknown folder)
    vdir = _export(net, info, data, out or staging_area(), version or None, split_path, evaluate_test)
    console.print(f"checkpoint {checkpoint}")
    _staged(vdir)


def _staged(vdir: Path) -> None:
    console.print(f"staged {vdir} (not served)")
    if vdir.resolve().parent.parent != DEFAULT_REPOSITORY.resolve():
        console.print(f"to serve it: pneumotriage model deploy --model-dir {vdir}  (quality gate first)")


def _export(
    net,
    info: dict,
    data: Path,
    out: Path,
    version: int | None,
    split_path: Path,
    evaluate_test: bool,
    rethreshold: bool = False,
) -> Path:
    from services.inference.tools.training.export import export_version

    vdir = export_version(net, info, out, _check_images(data), version)
    if rethreshold:  # operating points from the exported ONNX on the validation split, current rule
        import numpy as np

        from services.core.calibration import choose_thresholds
        from services.inference.tools.evaluation import predict, select_records

        records = select_records(data, "val", split_path)
        _, probs, _ = predict(vdir, [r.path for r in records])
        meta = json.loads((vdir / "metadata.json").read_text())
        meta["thresholds"] = choose_thresholds(probs, np.array([r.label for r in records]))
        (vdir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    if evaluate_test:
        from services.inference.tools.evaluation import evaluate_folder, json_safe

        report = evaluate_folder(data, vdir, split="test", split_file=split_path, bootstrap=200, console=console)
        meta = json.loads((vdir / "metadata.json").read_text())
        meta["metrics"]["test"] = json_safe(report["summary"])
        (vdir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
        summary = report["summary"]
        console.print(
            f"test split ({summary['n_images']} images): AUC {summary['auc']['value']:.4f}"
            + "".join(f", {k} {summary[k]['value']:.4f}" for k in ("sensitivity", "specificity") if k in summary)
            + f" at threshold {summary['threshold']:.3f}"
        )
    check = json.loads((vdir / "metadata.json").read_text())["onnx_check"]
    console.print(
        f"ONNX vs PyTorch max abs diff: logit {check['max_abs_diff_logit']:.2e}, cam {check['max_abs_diff_cam']:.2e}"
    )
    return vdir


@model.command("export")
@user_errors_command
def export_cmd(
    checkpoint: Path = typer.Option(Path("var/model/pneumonia.pt"), help="checkpoint written by `model train`"),
    out: Path = typer.Option(
        None, help="repository to stage the version in (default: <PT_DATA_DIR>/model-staging; never the live one)"
    ),
    version: int = typer.Option(0, help="version number (0: next free)"),
    data: Path = typer.Option(
        DEFAULT_DATA, exists=True, file_okay=False, help="real images to check ONNX against PyTorch (and evaluate)"
    ),
    split_file: Path = typer.Option(None, help="patient split JSON (default: the committed one)"),
    evaluate_test: bool = typer.Option(True),
    rethreshold: bool = typer.Option(
        False, help="recompute the operating thresholds on the validation split with the current rule"
    ),
) -> None:
    """Export a trained checkpoint to ONNX as a new model-repository version (checked against PyTorch)."""
    from services.inference.tools.training.split import SPLIT_FILE

    net, info = load_checkpoint_or_fail(checkpoint)
    vdir = _export(
        net, info, data, out or staging_area(), version or None, split_file or SPLIT_FILE, evaluate_test, rethreshold
    )
    _staged(vdir)


@model.command("evaluate")
@user_errors_command
def evaluate_cmd(
    data: Path = typer.Option(
        DEFAULT_DATA, exists=True, file_okay=False, help="any folder laid out as NORMAL/ and PNEUMONIA/"
    ),
    model_dir: Path = typer.Option(
        None, help="model version dir (model.onnx + metadata.json); default: the live repository's active one"
    ),
    split: str = typer.Option("all", help="all | test | val | train (the last three need the training data)"),
    split_file: Path = typer.Option(None, help="patient split JSON (default: the committed one)"),
    out: Path = typer.Option(Path("var/model-eval"), help="report directory (JSON + PNGs)"),
    bootstrap: int = typer.Option(1000, help="bootstrap resamples for the 95% CIs"),
    simulate_aspect: float = typer.Option(
        0.0, help="resample every image to this width/height first (e.g. 1.3: true-aspect, letter-boxed input)"
    ),
) -> None:
    """Evaluate the ONNX model with onnxruntime: metrics with bootstrap CIs, calibration, plots, subgroups."""
    from services.inference.tools.evaluation import evaluate_folder, print_summary

    if split not in ("all", "test", "val", "train"):
        raise typer.BadParameter("split must be all, test, val or train")
    vdir = require_model_dir(model_dir or active_model_dir(DEFAULT_REPOSITORY))
    report = evaluate_folder(
        data,
        vdir,
        split=split,
        split_file=split_file,
        bootstrap=bootstrap,
        out=out,
        console=console,
        aspect=simulate_aspect or None,
    )
    print_summary(report, console)
    console.print(f"report written to {out}")


def set_operating_threshold(version_dir: Path, threshold: float, rule: str) -> dict:
    """Write ``threshold`` as the version's operating threshold (metadata.json), saying by which rule
    and what it was; rule-out stays at or below it and urgent at or above it. Returns the metadata."""
    meta = json.loads((version_dir / "metadata.json").read_text())
    t = meta["thresholds"]
    meta["threshold_choice"] = {"operating": rule, "operating_before": t["operating"]}
    t["operating"] = float(threshold)
    t["rule_out"], t["urgent"] = min(t["rule_out"], t["operating"]), max(t["urgent"], t["operating"])
    (version_dir / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


@model.command("proxy-eval")
@user_errors_command
def proxy_eval_cmd(
    data: Path = typer.Option(
        DEFAULT_DATA,
        exists=True,
        file_okay=False,
        help="the training folder (NORMAL/, PNEUMONIA/) holding the held-out batches",
    ),
    model_dir: list[Path] = typer.Option(None, help="model version dir(s); default: the active version"),
    sample: int = typer.Option(0, help="evaluate a class-stratified sample of this many held-out images (0: all)"),
    stress: list[str] = typer.Option(None, help="stress condition(s) to run (default: the whole suite)"),
    out: Path = typer.Option(Path("var/model-eval"), help="report directory (proxy-v<version>.json)"),
    set_threshold: bool = typer.Option(
        False, help="choose the operating threshold on the proxy and write it into the version's metadata.json"
    ),
) -> None:
    """Proxy external validation: held-out acquisition batches under a stress suite of realistic shifts."""
    from rich.table import Table

    from services.inference.tools.proxy import proxy_evaluate, write_report

    dirs = [require_model_dir(d) for d in model_dir] if model_dir else [active_model_dir(DEFAULT_REPOSITORY)]
    from services.inference.tools.progress import progress_bar

    with progress_bar(console) as progress:
        reports = [
            proxy_evaluate(d, data, sample or None, stress or None, choose_threshold=set_threshold, progress=progress)
            for d in dirs
        ]
    if set_threshold:
        for d, report in zip(dirs, reports, strict=True):
            meta = set_operating_threshold(
                d,
                report["operating_threshold"],
                "proxy-eval --set-threshold: sensitivity >= 0.97 on the clean held-out batches "
                "and >= 0.95 under every stress condition",
            )
            console.print(
                f"{d}: operating threshold {meta['threshold_choice']['operating_before']:.4f}"
                f" -> {meta['thresholds']['operating']:.4f}"
            )
    for report in reports:
        table = Table(
            title=f"model v{report['model_version']}: {report['n_images']} held-out images "
            f"({report['n_pneumonia']} pneumonia), threshold {report['operating_threshold']:.3f}"
        )
        for col in ("condition", "AUC", "acc", "sens", "spec", "spec@sens95", "ECE"):
            table.add_column(col)
        for name, m in report["conditions"].items():
            table.add_row(
                name,
                *(
                    f"{m[k]:.3f}"
                    for k in ("auc", "accuracy", "sensitivity", "specificity", "specificity_at_sens95", "ece")
                ),
            )
        console.print(table)
        console.print(
            "worst case: "
            + ", ".join(f"{k} {v['value']:.3f} ({v['condition']})" for k, v in report["worst_case"].items())
        )
        console.print(f"report written to {write_report(report, out)}")


@model.command("hard-proxy")
@user_errors_command
def hard_proxy_cmd(
    data: Path = typer.Option(DEFAULT_DATA, exists=True, file_okay=False, help="the training folder (its val/test)"),
    model_dir: list[Path] = typer.Option(None, help="model version dir(s); default: the active version"),
    sample: int = typer.Option(0, help="a class-stratified sample of this many proxy images (0: all)"),
    draws: int = typer.Option(5, help="independent shift draws per image"),
    out: Path = typer.Option(Path("var/model-eval"), help="report directory (hard-proxy-v<version>.json)"),
    calibrate_checkpoint: Path = typer.Option(
        None,
        help="re-fit the calibration on this proxy and re-export the version from this `model train` checkpoint",
    ),
    set_threshold: bool = typer.Option(
        False,
        help="operating threshold = the lower of this proxy's (mean sensitivity >= 0.97) and the clean "
        "validation split's (sensitivity >= 0.95), written into metadata.json",
    ),
    fit_hardness: bool = typer.Option(
        False, help="first re-fit the weak model's out-of-fold scores (hard_proxy_hardness.json, committed)"
    ),
) -> None:
    """The hard-normal shift proxy (the hardest fifth of the held-out normals under geometry shifts):
    reproduces what the official test split showed for v1 and v2 (docs/model-card.md)."""
    import numpy as np
    from rich.table import Table

    from services.inference.tools.hard_proxy import hard_proxy_evaluate, proxy_calibration, score
    from services.inference.tools.progress import progress_bar
    from services.inference.tools.training.split import SPLIT_FILE

    dirs = [require_model_dir(d) for d in model_dir] if model_dir else [active_model_dir(DEFAULT_REPOSITORY)]
    out.mkdir(parents=True, exist_ok=True)
    if fit_hardness:
        from services.inference.tools.hard_proxy import HARDNESS_FILE
        from services.inference.tools.hard_proxy import fit_hardness as fit

        with progress_bar(console) as progress:
            fitted = fit(data, progress=progress)
        HARDNESS_FILE.write_text(json.dumps(fitted, indent=0, sort_keys=True) + "\n")
        console.print(f"weak model: out-of-fold AUC {fitted['weak_oof_auc']:.4f}; scores written to {HARDNESS_FILE}")
    table = Table(title="hard-normal shift proxy (mean of draws; accuracy and ECE at prevalence 0.60)")
    for col in ("version", "n (normal)", "threshold", "AUC", "sens", "spec", "acc", "spec@sens95", "ECE", "chosen"):
        table.add_column(col)
    for d in dirs:
        with progress_bar(console) as progress:
            report = hard_proxy_evaluate(d, data, sample or None, draws, progress=progress)
        if calibrate_checkpoint is not None:
            calibration = proxy_calibration(report)
            net, info = load_checkpoint_or_fail(calibrate_checkpoint)
            net.shift_logit(calibration["bias_shift"])
            info["calibration"] = {"validation": info["calibration"], **calibration}
            # rule-out / urgent cut-offs chosen again on the validation split under the new calibration
            _export(net, info, data, d.parent.parent, int(d.name), SPLIT_FILE, evaluate_test=True, rethreshold=True)
            console.print(
                f"{d}: calibration re-fitted on the proxy: T = {calibration['temperature']:.3f}, offset "
                f"{calibration['bias_shift']:+.3f} (cross-fitted ECE {calibration['cross_fitted_ece_at_prior']:.3f})"
            )
            # the re-exported network is the same one with its logit shifted: no second inference
            shifted = (np.asarray(report["logits"]) + calibration["bias_shift"]).round(5).tolist()
            report = score(report | {"logits": shifted}, json.loads((d / "metadata.json").read_text()))
        if set_threshold:
            from services.core.calibration import threshold_for_sensitivity
            from services.inference.tools.evaluation import predict, select_records

            # the proxy's shifts raise pneumonia scores too: clean validation images must keep the
            # product's sensitivity target as well, whichever threshold is lower wins
            val = select_records(data, "val", SPLIT_FILE)
            _, val_probs, _ = predict(d, [r.path for r in val])
            on_val = threshold_for_sensitivity(np.array([r.label for r in val]), val_probs, 0.95)
            meta = set_operating_threshold(
                d,
                min(report["chosen_threshold"], on_val),
                "model hard-proxy --set-threshold: the lower of the highest threshold keeping the mean "
                "sensitivity over the draws >= 0.97 on the hard-normal shift proxy "
                f"({report['chosen_threshold']:.4f}) and the highest keeping sensitivity >= 0.95 on the "
                f"clean validation split ({on_val:.4f})",
            )
            report = score(report, meta)
        m = report["metrics"]
        table.add_row(
            str(report["model_version"]),
            f"{report['n_images']} ({report['n_normal']})",
            f"{report['threshold']:.3f}",
            *(
                f"{m[k]:.3f}"
                for k in ("auc", "sensitivity", "specificity", "accuracy_at_prior", "specificity_at_sens95")
            ),
            f"{m['ece_at_prior']:.3f}",
            f"{report['chosen_threshold']:.3f}",
        )
        (out / f"hard-proxy-v{report['model_version']}.json").write_text(json.dumps(report) + "\n")
    console.print(table)
    console.print(f"reports written to {out}")
