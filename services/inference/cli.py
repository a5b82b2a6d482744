"""`pneumotriage inference` (run the service), `inference predict`, and `pneumotriage model ...`
(train/evaluate/export from model_cli.py, plus `deploy` from here)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.inference.config import DEFAULT_MODEL_REPOSITORY
from services.inference.tools.gate_cli import register as register_gate_commands

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
    model_dir: Path = typer.Option(None, "--model-dir", help="exported version dir (model.onnx + metadata.json)"),
    version: int = typer.Option(None, "--version", help="version number (new: default next free; alone: roll to it)"),
    triton_url: str = typer.Option(
        None, "--triton-url", envvar="PT_INFERENCE_TRITON_URL", help="Triton gRPC host:port to load it in"
    ),
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, "--repository", help="Triton model repository"),
    name: str = typer.Option("pneumonia", "--model-name", help="model name in the repository"),
    timeout: float = typer.Option(120.0, help="seconds to wait for Triton to make the version ready"),
) -> None:
    """Add a model version to the repository and make Triton serve it (or roll to an existing version)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from services.inference.deploy import DeployError, deploy

    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as p:
            p.add_task(f"deploying {name} to {repository}" + (f" and Triton {triton_url}" if triton_url else ""))
            result = deploy(repository, name, model_dir, version, triton_url, timeout)
    except DeployError as exc:
        console.print(f"[red]deploy failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    action = "added and pinned" if result.copied else "pinned"
    console.print(f"{name} version {result.version} {action} (was {result.previous})")
    if result.loaded_in_triton:
        console.print(f"Triton serves {name} version(s) {', '.join(result.ready_versions) or '-'}")
    else:
        console.print("no Triton URL: the embedded runtime serves the pinned version at its next start")


try:  # the model group (train/evaluate/export) belongs to model_cli.py; deploy is added here
    from services.inference.tools.model_cli import model as model_group
except ModuleNotFoundError as exc:  # pragma: no cover - before model_cli.py exists
    if exc.name != "services.inference.tools.model_cli":
        raise
    model_group = typer.Typer(name="model", help="Model lifecycle.", no_args_is_help=True)

model_group.command("deploy")(deploy_command)
register_gate_commands(model_group)  # gate-fit, gate-evaluate, drift-reference (issue 10)
app.add_typer(model_group, name="model")
