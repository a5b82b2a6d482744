"""`pneumotriage inference` (run the service), `inference predict`, and `pneumotriage model ...`
(train/evaluate/export from model_cli.py, plus `deploy` from here)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.inference.config import DEFAULT_MODEL_REPOSITORY
from services.inference.tools.gate_cli import register as register_gate_commands
from services.inference.tools.registry_cli import register as register_registry_commands
from services.inference.tools.site_cli import register_site_commands

console = Console()
app = typer.Typer(no_args_is_help=True)
inference = typer.Typer(
    name="inference",
    help="Run the inference service (no subcommand), or predict files locally.",
    invoke_without_command=True,
)
app.add_typer(inference, name="inference")


@inference.callback()
def run(
    ctx: typer.Context,
    triton_url: str = typer.Option(
        None, help="Triton gRPC host:port (default: PT_INFERENCE_TRITON_URL; unset: embedded)"
    ),
    http_port: int = typer.Option(None, help="ops HTTP port (default: PT_INFERENCE_HTTP_PORT, 8002)"),
    model_version: str = typer.Option(None, help="serve this version (default: the pinned/newest one)"),
) -> None:
    """Consume image.received, publish prediction.made (ack after the publish is confirmed)."""
    if ctx.invoked_subcommand is not None:
        return
    from services.inference.app import main
    from services.inference.config import InferenceSettings

    overrides = {
        k: v for k, v in {"triton_url": triton_url, "http_port": http_port, "model_version": model_version}.items() if v
    }
    main(InferenceSettings(**overrides))


@inference.command("predict")
def predict_cmd(
    files: list[Path] = typer.Argument(..., help="DICOM files"),
    triton_url: str = typer.Option(None, help="Triton gRPC host:port (default: embedded onnxruntime)"),
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, help="model repository"),
    model_version: str = typer.Option("", help="version (default: pinned/newest)"),
) -> None:
    """Predict DICOM files through the service pipeline (no broker) and print the probabilities."""
    import asyncio
    import hashlib

    from rich.progress import Progress

    from services.core.contracts import ImageReceived
    from services.inference.config import InferenceSettings
    from services.inference.runtime import make_runtime
    from services.inference.worker import Pipeline

    settings = InferenceSettings(
        triton_url=triton_url, model_repository=repository, model_version=model_version, heatmaps=False
    )

    uris = {p: p.resolve().as_uri() for p in files}
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    async def go() -> list[tuple[Path, object]]:
        runtime = make_runtime(settings)
        await runtime.start()
        pipeline = Pipeline(
            runtime,
            max_batch=settings.max_batch,
            decode_workers=settings.decode_workers,
            gate_file=settings.resolved_gate_file(),
        )
        pipeline.start()
        results: list[tuple[Path, object]] = []
        try:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("predicting", total=len(files))

                async def one(path: Path) -> None:
                    event = ImageReceived(triage_eligible=True)
                    event.image.sop_instance_uid = path.name
                    event.image.storage_uri = uris[path]
                    event.image.sha256 = digests[path]
                    try:
                        results.append((path, await pipeline.predict(event)))
                    except Exception as exc:
                        results.append((path, exc))
                    progress.advance(task)

                await asyncio.gather(*(one(p) for p in files))
        finally:
            await pipeline.close()
            await runtime.close()
        return results

    table = Table("file", "P(pneumonia)", "logit", "model", "runtime", "ms", "input gate")
    for path, res in sorted(asyncio.run(go()), key=lambda r: str(r[0])):
        if isinstance(res, Exception):
            table.add_row(path.name, f"[red]{res}[/red]", "", "", "", "", "")
        else:
            table.add_row(
                path.name,
                f"{res.probability:.4f}",
                f"{res.logit:+.3f}",
                f"{res.model_name} v{res.model_version}",
                res.runtime,
                f"{res.latency_ms:.1f}",
                f"{res.gate_verdict}: {res.gate_reason}" if res.gate_reason else res.gate_verdict,
            )
    console.print(table)


def deploy_command(
    model_dir: Path = typer.Option(None, "--model-dir", help="staged version dir (model.onnx + metadata.json)"),
    version: int = typer.Option(None, "--version", help="version number (new: default next free; alone: roll to it)"),
    triton_url: str = typer.Option(
        None, "--triton-url", envvar="PT_INFERENCE_TRITON_URL", help="Triton gRPC host:port to load it in"
    ),
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, "--repository", help="the live model repository"),
    name: str = typer.Option("pneumonia", "--model-name", help="model name in the repository"),
    timeout: float = typer.Option(120.0, help="seconds to wait for Triton to make the version ready"),
    reference_data: Path = typer.Option(
        None, "--reference-data", help="quality gate images, NORMAL/ + PNEUMONIA/ (default: the shared training data)"
    ),
    reference_split: str = typer.Option("test", "--reference-split", help="test | val | train | all"),
    reference_limit: int = typer.Option(0, "--reference-limit", help="at most this many reference images (0: all)"),
    split_file: Path = typer.Option(None, "--split-file", help="patient split JSON (default: the committed one)"),
    max_auc_drop: float = typer.Option(0.01, "--max-auc-drop", help="refuse below the active AUC minus this"),
    max_sensitivity_drop: float = typer.Option(
        0.02, "--max-sensitivity-drop", help="refuse below the active sensitivity (at its threshold) minus this"
    ),
    force: bool = typer.Option(False, "--force", help="deploy even if the quality gate refuses (needs --reason)"),
    reason: str = typer.Option(None, "--reason", help="why a refused candidate is forced through (recorded)"),
) -> None:
    """Make a version active: a staged one (--model-dir: quality gate, copy, load, pin) or an existing
    one (--version alone: roll back or forward). Nothing changes unless the runtime loaded it.

    Exit 0 deployed; 1 the runtime did not load it; 2 a mistake in the request or the files;
    3 refused by the quality gate."""
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from services.inference.deploy import DeployError, QualityGateRefused, RuntimeLoadError, deploy
    from services.inference.tools.deploy_gate import Margins, ReferenceGate, ReferenceSet

    if force and not (reason or "").strip():
        console.print('[red]--force needs --reason "..."[/red] (it is recorded with the deploy)')
        raise typer.Exit(2)
    if reason and not force:
        console.print("[red]--reason is only used with --force[/red]")
        raise typer.Exit(2)
    gate = None
    if model_dir is not None:
        from services.inference.tools.model_cli import DEFAULT_DATA

        gate = ReferenceGate(
            ReferenceSet(reference_data or DEFAULT_DATA, reference_split, split_file, reference_limit),
            Margins(max_auc_drop, max_sensitivity_drop),
            console,
        )
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as p:
            task = p.add_task(f"deploying {name} to {repository}" + (f" and Triton {triton_url}" if triton_url else ""))
            result = deploy(
                repository,
                name,
                model_dir,
                version,
                triton_url,
                timeout,
                gate=gate,
                force_reason=reason.strip() if force and reason else None,
                say=lambda text: p.update(task, description=text),
            )
    except QualityGateRefused as exc:
        print_quality(exc.report)
        console.print(f"[red]refused by the quality gate:[/red] {escape(str(exc))}")
        console.print('nothing changed; `--force --reason "..."` deploys it anyway (recorded)')
        raise typer.Exit(3) from exc
    except RuntimeLoadError as exc:
        console.print(f"[red]deploy failed, nothing changed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    except DeployError as exc:
        console.print(f"[red]deploy refused, nothing changed:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if result.quality:
        print_quality(result.quality)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    action = "added and pinned" if result.copied else "pinned"
    was = "none" if result.previous is None else f"version {result.previous}"
    console.print(f"{name} version {result.version} {action} (was {was})")
    if result.drift_reference:
        console.print(f"drift reference: {repository / name / str(result.version) / 'drift_reference.json'}")
    if result.loaded_in_triton:
        console.print(f"Triton serves {name} version(s) {', '.join(result.ready_versions) or '-'}")
    else:
        console.print(
            "the embedded runtime loaded it here; a running inference service serves it after its next restart"
        )
    if version is not None and result.previous is not None and result.previous != result.version:
        # a roll-back (or a switch to an existing version): the withdrawn version's studies keep its flags
        console.print(
            f"studies model version {result.previous} judged keep its flags until re-scored: once inference"
            f" serves version {result.version}, run\n  pneumotriage triage rescore --model-version"
            f' {result.previous} --reason "version {result.previous} withdrawn"'
        )


def print_quality(report: dict) -> None:
    """The quality gate's figures: candidate against the active version on the reference set."""
    ref = report["reference"]
    table = Table(
        title=f"quality gate: {ref['n_images']} reference images ({ref['n_pneumonia']} pneumonia), "
        f"{ref['split']} split of {ref['data']}"
    )
    for col in ("version", "AUC", "sensitivity", "specificity", "threshold"):
        table.add_column(col)
    rows = [("candidate", report["candidate"])]
    if report.get("active"):
        rows.append((f"active (v{report['active']['version']})", report["active"]))
    for label, f in rows:
        table.add_row(
            label, f"{f['auc']:.4f}", f"{f['sensitivity']:.4f}", f"{f['specificity']:.4f}", f"{f['threshold']:.3f}"
        )
    console.print(table)
    m = report["margins"]
    verdict = "[green]passed[/green]" if report["passed"] else "[red]failed[/red]"
    console.print(
        f"gate {verdict} (margins: AUC -{m['max_auc_drop']}, sensitivity -{m['max_sensitivity_drop']})"
        + ("" if report.get("active") else ": no active version to compare with")
    )


try:  # the model group (train/evaluate/export) belongs to model_cli.py; deploy is added here
    from services.inference.tools.model_cli import model as model_group
except ModuleNotFoundError as exc:  # pragma: no cover - before model_cli.py exists
    if exc.name != "services.inference.tools.model_cli":
        raise
    model_group = typer.Typer(name="model", help="Model lifecycle.", no_args_is_help=True)

model_group.command("deploy")(deploy_command)
register_gate_commands(model_group)  # gate-fit, gate-evaluate, drift-reference (issue 10)
register_registry_commands(model_group)  # list, status (issue 27)
register_site_commands(model_group)  # adapt, shadow-add, compare, promote (issue 28)
app.add_typer(model_group, name="model")
