"""`pneumotriage model gate-fit | gate-evaluate | drift-reference` (mounted on the `model` group by
services/inference/cli.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console

from services.core.gate import DEFAULT_GATE_FILE
from services.inference.config import DEFAULT_MODEL_REPOSITORY
from services.inference.tools.cli_errors import active_model_dir, fail, require_model_dir, user_errors_command
from services.inference.tools.progress import progress_bar

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kermany224" / "train"
console = Console()


def gate_staging_area() -> Path:
    """Where `model gate-fit` writes new gates by default: <PT_DATA_DIR>/gate-staging (never the
    committed gate that inference and labeling load)."""
    from services.core.settings import CommonSettings

    return CommonSettings().data_dir / "gate-staging"


def _gate_version(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("version", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _committed_hidden_units() -> int:
    """The committed gate's hidden layer width (0: logistic regression): the default architecture."""
    try:
        hidden = json.loads(DEFAULT_GATE_FILE.read_text()).get("hidden") or []
        return len(hidden[0]["b"]) if hidden else 0
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0


def next_gate_version(staging: Path) -> str:
    """gate-<N+1>, N the highest number among the committed gate's and the staged gates' versions."""
    taken = [_gate_version(DEFAULT_GATE_FILE)]
    if staging.is_dir():
        taken += [_gate_version(p) for p in staging.glob("*.json")]
    numbers = [int(m.group(1)) for v in taken if (m := re.fullmatch(r"gate-(\d+)", v))]
    return f"gate-{max(numbers, default=0) + 1}"


@user_errors_command
def gate_fit(
    data: Path = typer.Option(DEFAULT_DATA, help="folder with NORMAL/ and PNEUMONIA/ (its training split is used)"),
    out: Path | None = typer.Option(
        None,
        help="gate model file to write (default: <PT_DATA_DIR>/gate-staging/gate_model-<version>.json; "
        "never an existing file without --overwrite)",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="allow --out to replace an existing file"),
    seed: int = typer.Option(0),
    limit: int = typer.Option(0, help="use at most this many training chests (0: all)"),
    variants: int = typer.Option(1, help="site variants per training chest"),
    c: float = typer.Option(0.3, "--c", help="inverse L2 strength of the logistic regression"),
    refuse_quantile: float = typer.Option(0.003, help="share of held-out chests below the refuse threshold"),
    borderline_quantile: float = typer.Option(0.01, help="share of held-out chests below the borderline threshold"),
    version: str = typer.Option(
        "", help="version string carried in every prediction (default: gate-<N+1>, a new one); never the committed's"
    ),
    hidden: int = typer.Option(
        -1, help="hidden ReLU units (0: logistic regression; default: the committed gate's, 32)", show_default=False
    ),
) -> None:
    """Fit the input gate's "frontal chest radiograph" score against non-chest negatives (model-agnostic).
    Writes a new, versioned gate to the staging area: the committed gate (services/core/gate_model.json)
    is never replaced by default. Measure it with `model gate-evaluate --gate <file>`, then point
    PT_INFERENCE_GATE_FILE and PT_LABELING_GATE_FILE at it."""
    from services.inference.tools.gate_fit import build_corpus, fit_gate

    staging = gate_staging_area()
    version = version.strip() or next_gate_version(staging)
    committed = _gate_version(DEFAULT_GATE_FILE)
    if version == committed:
        fail(f"version {version!r} is the committed gate's: a new gate needs a new version string (--version)")
    target = out if out is not None else staging / f"gate_model-{version}.json"
    if target.exists() and not overwrite:
        fail(
            f"{target} exists (version {_gate_version(target) or '?'}); nothing written:"
            " choose another --out or add --overwrite"
        )
    if target.exists() and target.resolve() == DEFAULT_GATE_FILE.resolve():
        console.print(f"[yellow]note:[/yellow] replacing the committed gate {DEFAULT_GATE_FILE} (was {committed})")
    if not data.is_dir():
        fail(f"{data} is not a directory")
    hidden = _committed_hidden_units() if hidden < 0 else hidden
    with progress_bar(console) as progress:
        corpus = build_corpus(data, seed=seed, limit=limit, variants=variants, progress=progress)
        console.print(f"corpus: {int(corpus.y.sum())} chest, {int((1 - corpus.y).sum())} non-chest feature vectors")
        model = fit_gate(corpus, seed, c, refuse_quantile, borderline_quantile, version, hidden, progress=progress)
    model.meta["data"] = str(data.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save(target)
    console.print(
        f"wrote {target} (version {version}, {model.meta['model']}): refuse < {model.refuse_below:.3f},"
        f" borderline < {model.borderline_below:.3f}"
    )
    console.print(
        f"measure it: pneumotriage model gate-evaluate --gate {target}; use it: PT_INFERENCE_GATE_FILE and"
        f" PT_LABELING_GATE_FILE={target}"
    )
    for kind, row in model.meta["out_of_fold_by_kind"].items():
        console.print(f"  {kind:24s} n={row['n']:5d} refused {row['refused']:.3f}")


@user_errors_command
def gate_evaluate(
    data: Path = typer.Option(
        DEFAULT_DATA, exists=True, file_okay=False, help="folder with NORMAL/ and PNEUMONIA/ (val+test splits are used)"
    ),
    gate_file: Path = typer.Option(DEFAULT_GATE_FILE, "--gate", exists=True, dir_okay=False, help="gate model file"),
    limit: int = typer.Option(0, help="at most this many held-out chests (0: all)"),
    seed: int = typer.Option(0),
    report: Path | None = typer.Option(None, help="also write the figures as JSON"),
) -> None:
    """Measure the gate: false-refusal rate on held-out chests (as JPEG, 12-bit MONOCHROME1, 16-bit,
    true aspect, JPEG DICOM) and refusal rate on the non-chest corpus."""
    from services.core.gate import GateModel
    from services.inference.tools.gate_fit import evaluate_gate

    with progress_bar(console) as progress:
        results = evaluate_gate(GateModel.load(gate_file), data, limit=limit, seed=seed, progress=progress)
    for name, row in results.items():
        console.print(
            f"{name:28s} n={row['n']:5d} refused {row['refused']:.4f} "
            f"borderline {row['borderline']:.4f} ok {row['ok']:.4f}"
        )
    if report:
        report.write_text(json.dumps(results, indent=1) + "\n")


@user_errors_command
def drift_reference(
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, help="Triton model repository"),
    name: str = typer.Option("pneumonia", "--model-name"),
    version: str = typer.Option("", help="model version (default: the active one)"),
    data: Path = typer.Option(DEFAULT_DATA, exists=True, file_okay=False, help="folder with NORMAL/ and PNEUMONIA/"),
    split: str = typer.Option("val", help="which split's predictions make the reference"),
    limit: int = typer.Option(0, help="at most this many images (0: all)"),
) -> None:
    """Write <repository>/<model>/<version>/drift_reference.json: the score distribution the drift
    monitor compares live predictions with (re-run for every new model version)."""
    from services.core.drift import REFERENCE_FILE, build_reference
    from services.inference.tools.evaluation import predict, select_records

    if version and not (repository / name / version).is_dir():
        fail(f"no version {version} of {name} in {repository}")
    vdir = require_model_dir(repository / name / version if version else active_model_dir(repository, name))
    records = select_records(data, split, None)
    if limit:
        records = records[:: max(1, len(records) // limit)][:limit]
    with progress_bar(console) as progress:
        logits, probs, _ = predict(vdir, [r.path for r in records], progress=progress)
    ref = build_reference(logits, probs, name, vdir.name, f"{split} split, {len(records)} images")
    ref.save(vdir / REFERENCE_FILE)
    console.print(
        f"wrote {vdir / REFERENCE_FILE}: {ref.n} predictions, predicted-positive rate {ref.positive_rate:.3f}, "
        f"median logit {ref.quantiles[50]:.2f}"
    )


def register(model_group: typer.Typer) -> None:
    model_group.command("gate-fit")(gate_fit)
    model_group.command("gate-evaluate")(gate_evaluate)
    model_group.command("drift-reference")(drift_reference)
