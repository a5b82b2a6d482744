"""`pneumotriage model adapt | shadow-add | compare | promote`: the site loop (issue 28, docs/operations.md)."""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.inference.tools.cli_errors import fail, require_torch, user_errors_command

console = Console()
PROMOTIONS_FILE = "promotions.jsonl"


def _live() -> Path:
    from services.inference.tools.model_cli import DEFAULT_REPOSITORY

    return DEFAULT_REPOSITORY


def adapt_command(
    data: list[Path] = typer.Option(
        ...,
        exists=True,
        file_okay=False,
        help="site labels: folders NORMAL/ PNEUMONIA/ or labeling exports; the"
        " first one that holds an image wins (list clinician-confirmed folders first)",
    ),
    site: str = typer.Option(..., help="site name: its locked test set is carved once and reused"),
    base_version: int = typer.Option(..., help="the live repository's version to fine-tune"),
    repository: Path = typer.Option(None, help="live model repository (default: deploy/triton/model_repository)"),
    out: Path = typer.Option(None, help="repository to stage the candidate in (default: <PT_DATA_DIR>/model-staging)"),
    epochs: int = typer.Option(4),
    lr: float = typer.Option(3e-4),
    seed: int = typer.Option(1234),
    threads: int = typer.Option(2),
    min_per_class: int = typer.Option(20, help="refuse with fewer training labels of a class"),
    min_locked_per_class: int = typer.Option(10, help="refuse with fewer locked test images of a class"),
    locked_fraction: float = typer.Option(0.3, help="share of the site's patients locked away for testing"),
    min_confidence: float = typer.Option(0.8, help="crowd labels (exports) below this confidence are dropped"),
    bootstrap: int = typer.Option(500),
) -> None:
    """Fine-tune a base version on a site's labels into a staged candidate, with the locked-set evidence."""
    require_torch()
    from services.inference.tools.adapt import AdaptRecipe, NotEnoughLabels, adapt
    from services.inference.tools.model_cli import _staged, staging_area

    base_dir = (repository or _live()) / "pneumonia" / str(base_version)
    if not (base_dir / "model.onnx").is_file():
        fail(f"no base version {base_version} in {base_dir.parent}")
    recipe = AdaptRecipe(
        epochs=epochs,
        lr=lr,
        seed=seed,
        threads=threads,
        min_per_class=min_per_class,
        min_locked_per_class=min_locked_per_class,
        locked_fraction=locked_fraction,
        min_confidence=min_confidence,
        bootstrap=bootstrap,
    )
    try:
        vdir = adapt(list(data), base_dir, out or staging_area(), site, recipe, console=console)
    except NotEnoughLabels as exc:
        fail(str(exc))
    comparison = json.loads((vdir / "metadata.json").read_text())["metrics"]["locked_site_test"]
    print_comparison(comparison, f"locked site test set ({site})")
    _staged(vdir)
    console.print(
        f"to shadow it: pneumotriage model shadow-add --model-dir {vdir}, then PT_INFERENCE_SHADOW_VERSIONS=<N>"
    )


def print_comparison(c: dict, title: str) -> None:
    table = Table(title=f"{title}: {c['n_images']} images, {c['n_patients']} patients, {c['n_pneumonia']} pneumonia")
    for col in ("", "AUC", "sensitivity", "specificity", "ECE", "threshold"):
        table.add_column(col)

    def cell(m: dict, k: str) -> str:
        lo, hi = m[f"{k}_ci95"]
        return f"{m[k]:.3f} [{lo:.3f}, {hi:.3f}]"

    for name in ("candidate", "reference"):
        m = c[name]
        table.add_row(
            f"{name} v{m['version']}",
            cell(m, "auc"),
            cell(m, "sensitivity"),
            cell(m, "specificity"),
            f"{m['ece']:.3f}",
            f"{m['threshold']:.3f}",
        )
    d = c["difference"]
    table.add_row(
        "difference (paired)",
        *(
            f"{d[k]['value']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]"
            for k in ("auc", "sensitivity", "specificity")
        ),
        "",
        "",
    )
    console.print(table)
    console.print(f"agreement of the flags (each at its own threshold): {c['agreement']:.3f}")


def shadow_add_command(
    model_dir: Path = typer.Option(..., exists=True, file_okay=False, help="a staged candidate version"),
    repository: Path = typer.Option(None, help="live model repository"),
) -> None:
    """Copy a staged candidate into the live repository WITHOUT activating it (for shadow mode)."""
    from services.inference.deploy import DeployError, active_version, add_version, pin_version
    from services.inference.repository import read_version_policy

    repo = repository or _live()
    active = active_version(repo, "pneumonia")
    if active is None:
        fail(f"no version in {repo / 'pneumonia'}: deploy one first")
    if not read_version_policy((repo / "pneumonia" / "config.pbtxt").read_text()):
        # unpinned, the newest version is served: pin the one served now, so the candidate is not
        pin_version(repo, "pneumonia", active)
        console.print(f"pinned the served version {active} in config.pbtxt (a new version must not take over)")
    try:
        locked = model_dir / "locked_test_set.json"
        files = {locked.name: locked.read_text()} if locked.is_file() else None
        version, _ = add_version(repo, "pneumonia", model_dir, files=files)
    except DeployError as exc:
        fail(str(exc))
    console.print(f"added as version {version} (not active). Shadow it: PT_INFERENCE_SHADOW_VERSIONS={version}")


def _version_dir(repo: Path, version: int) -> Path:
    vdir = repo / "pneumonia" / str(version)
    if not (vdir / "metadata.json").is_file():
        fail(f"no version {version} in {repo / 'pneumonia'}")
    return vdir


def _locked_comparison(candidate_dir: Path, active_dir: Path, bootstrap: int) -> dict | None:
    from services.inference.tools import site_loop

    locked_file = candidate_dir / "locked_test_set.json"
    if not locked_file.is_file():
        return None
    records = site_loop.locked_records(json.loads(locked_file.read_text()))
    import numpy as np

    y = np.array([r.label for r in records])
    return site_loop.paired_comparison(
        y,
        [r.patient for r in records],
        site_loop.score(candidate_dir, records),
        site_loop.score(active_dir, records),
        n=bootstrap,
    )


def compare_command(
    repository: Path = typer.Option(None, help="live model repository"),
    labels: Path = typer.Option(None, exists=True, file_okay=False, help="the site's confirmed labels (folder/export)"),
    bootstrap: int = typer.Option(500),
    data_dir: Path = typer.Option(None, help="PT_DATA_DIR of the inference service (its shadow predictions)"),
) -> None:
    """Versions, active, shadow; each version against the active one on its locked set and the site's labels."""
    import numpy as np

    from services.inference.deploy import active_version
    from services.inference.repository import list_versions
    from services.inference.shadow import ShadowStore, parse_versions, store_path
    from services.inference.tools import site_loop

    repo = repository or _live()
    active = active_version(repo, "pneumonia")
    shadows = parse_versions(os.environ.get("PT_INFERENCE_SHADOW_VERSIONS", ""))
    if data_dir is None:
        from services.core.settings import CommonSettings

        data_dir = CommonSettings().data_dir
    store = ShadowStore(store_path(data_dir)) if store_path(data_dir).exists() else None
    versions = list_versions(repo / "pneumonia")
    console.print(f"versions {versions}; active {active}; shadow {shadows or '-'}")
    if active is None:
        fail("no active version")
    active_dir = _version_dir(repo, active)
    for v in versions:
        if v == active:
            continue
        vdir = _version_dir(repo, v)
        console.rule(f"version {v} against the active version {active}")
        c = _locked_comparison(vdir, active_dir, bootstrap)
        if c is None:
            console.print("no locked site test set (not a site candidate)")
        else:
            print_comparison(c, "locked site test set")
            verdict = site_loop.promotion_verdict(c)
            console.print(
                "promotion rule: "
                + (
                    "[green]passes[/green]"
                    if verdict["passed"]
                    else "[red]fails[/red]: " + "; ".join(verdict["reasons"])
                )
            )
        if labels is not None:
            from services.inference.tools.training.sources import load_training_data

            records = load_training_data(labels).records
            y = np.array([r.label for r in records])
            lc = site_loop.paired_comparison(
                y,
                [r.patient for r in records],
                site_loop.score(vdir, records),
                site_loop.score(active_dir, records),
                n=bootstrap,
            )
            print_comparison(lc, f"site confirmed labels ({labels})")
        if store is not None:
            rows = store.rows(str(v))
            if rows:
                thr = float(json.loads((vdir / "metadata.json").read_text())["thresholds"]["operating"])
                athr = float(json.loads((active_dir / "metadata.json").read_text())["thresholds"]["operating"])
                agree = np.mean([(r["probability"] >= thr) == (r["active_probability"] >= athr) for r in rows])
                console.print(f"shadow: {len(rows)} live images scored, flag agreement with the active {agree:.3f}")


def promote_command(
    version: int = typer.Argument(..., help="the version to make active (a site candidate, or a previous one)"),
    reason: str = typer.Option(..., help="why (recorded)"),
    repository: Path = typer.Option(None, help="live model repository"),
    bootstrap: int = typer.Option(1000),
    triton_url: str = typer.Option(None, envvar="PT_INFERENCE_TRITON_URL"),
) -> None:
    """Activate a version only on the locked-set evidence (docs/model-card.md); `promote <previous>` undoes it."""
    from services.inference.deploy import DeployError, active_version, deploy, read_registry
    from services.inference.tools import site_loop

    repo = repository or _live()
    if not reason.strip():
        fail("--reason must say why")
    active = active_version(repo, "pneumonia")
    vdir = _version_dir(repo, version)
    if active == version:
        fail(f"version {version} is already active")
    promotions = repo / "pneumonia" / PROMOTIONS_FILE
    previously_active = {str(e.get("version")) for e in read_registry(repo, "pneumonia") if e.get("outcome") == "ok"}
    if promotions.exists():
        previously_active |= {
            str(json.loads(line).get("previous")) for line in promotions.read_text().splitlines() if line.strip()
        }
    comparison = _locked_comparison(vdir, _version_dir(repo, active), bootstrap) if active is not None else None
    if comparison is not None:
        print_comparison(comparison, "locked site test set")
        verdict = site_loop.promotion_verdict(comparison)
        kind = "promotion"
        if not verdict["passed"]:
            console.print("[red]refused:[/red] " + "; ".join(verdict["reasons"]))
            raise typer.Exit(3)
    elif str(version) in previously_active:
        verdict, kind = {"passed": True, "rule": "undo: a version that was active before"}, "undo"
    else:
        fail(f"version {version} has no locked site test set and was never active: nothing to judge it on")
    try:
        result = deploy(repo, "pneumonia", version=version, triton_url=triton_url)
    except DeployError as exc:
        fail(f"activation failed, nothing changed: {exc}")
    entry = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "version": version,
        "previous": result.previous,
        "user": os.environ.get("PT_USER") or getpass.getuser(),
        "reason": reason.strip(),
        "verdict": verdict,
        "locked_site_test": comparison,
    }
    with promotions.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    console.print(
        f"version {version} active (was {result.previous}); undo: pneumotriage model promote {result.previous}"
        f' --reason "..."'
    )
    console.print(
        "re-check the aggregator policy / site calibration for this version (pneumotriage triage recalibrate):"
        " one fitted on another version is not valid for it"
    )


def register_site_commands(group: typer.Typer) -> None:
    group.command("adapt")(user_errors_command(adapt_command))
    group.command("shadow-add")(user_errors_command(shadow_add_command))
    group.command("compare")(user_errors_command(compare_command))
    group.command("promote")(user_errors_command(promote_command))
