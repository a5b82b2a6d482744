"""`pneumotriage labeling ...`: run the service, manage users and gold, export, simulate a crowd."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer()
labeling = typer.Typer(
    help="Crowd labeling: annotator web app, quality control, aggregation, exports.",
    invoke_without_command=True,
)
app.add_typer(labeling, name="labeling")
console = Console(stderr=True)
T = TypeVar("T")


@labeling.callback()
def run_service(ctx: typer.Context) -> None:
    """Run the labeling service (image.received consumer, outbox relay, web app on PT_LABELING_HTTP_PORT)."""
    if ctx.invoked_subcommand is None:
        from services.labeling.app import main

        main()


def with_db(fn: Callable[[Any, Any, Any], Awaitable[T]]) -> T:
    """Run fn(session, job, settings) against the configured database (migrated first)."""
    from services.core.db import make_engine, make_sessionmaker, upgrade
    from services.labeling.app import record_job
    from services.labeling.config import LabelingSettings
    from services.labeling.job import load_job
    from services.labeling.models import Base

    settings = LabelingSettings()
    job = load_job(settings.labeling_job_file)

    async def _run() -> T:
        engine = make_engine(settings.database_url_for("labeling"))
        try:
            await upgrade(engine, "labeling", Base.metadata)
            sessions = make_sessionmaker(engine)
            await record_job(sessions, job)
            async with sessions() as s:
                result = await fn(s, job, settings)
                await s.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(_run())


@labeling.command("add-user")
def add_user(
    name: str = typer.Argument(..., help="sign-in name"),
    role: str = typer.Option("annotator", help="annotator | owner | admin"),
    password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=False),
) -> None:
    """Create a user (or reset the password and role of an existing one)."""
    from sqlalchemy import select

    from services.core.auth import ROLES, hash_password
    from services.labeling.models import User

    if role not in ROLES or role == "clinician":
        raise typer.BadParameter("role must be annotator, owner or admin")

    async def _add(s: Any, _job: Any, _settings: Any) -> str:
        user = await s.scalar(select(User).where(User.name == name))
        if user is None:
            user = User(name=name, role=role, password_hash=hash_password(password))
            s.add(user)
        else:
            user.role, user.password_hash = role, hash_password(password)
        await s.flush()
        return str(user.pseudonym)

    pseudonym = with_db(_add)
    typer.echo(f"user {name} ({role}) ready, pseudonymous id {pseudonym}")


@labeling.command("import-gold")
def import_gold_cmd(
    data: Path = typer.Option(..., exists=True, file_okay=False, help="folder with NORMAL/ and PNEUMONIA/"),
    n: int = typer.Option(48, min=2, help="gold items to add (half per class)"),
    reasons: Path | None = typer.Option(None, exists=True, dir_okay=False, help="YAML of reasons"),
    seed: int = typer.Option(7),
) -> None:
    """Add gold items (examples, quiz, hidden test questions) from images with known labels."""
    from services.labeling.gold import choose_gold, import_gold, load_reasons
    from services.labeling.render import cached_png

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        bar = progress.add_task("choosing gold images", total=None)
        chosen = choose_gold(data, n, seed)
        progress.update(bar, total=len(chosen), completed=0, description="rendering")

        async def _import(s: Any, job: Any, settings: Any) -> dict[str, int]:
            counts = await import_gold(s, job, chosen, load_reasons(reasons))
            await s.commit()  # render with no write transaction open (the running service keeps writing)
            from sqlalchemy import select

            from services.labeling.models import Task

            for t in (await s.scalars(select(Task).where(Task.source_path.is_not(None)))).all():
                cached_png(settings.render_dir(), t.id, Path(t.source_path), settings.labeling_render_max_side)
                progress.advance(bar)
            return counts

        counts = with_db(_import)
    typer.echo(json.dumps(counts))


@labeling.command("add-images")
def add_images_cmd(
    data: Path = typer.Option(..., exists=True, file_okay=False, help="folder with NORMAL/ and PNEUMONIA/ images"),
    n: int = typer.Option(100, min=1, help="images to add, drawn at random (natural class mix)"),
    seed: int = typer.Option(11),
) -> None:
    """Label an existing image archive: add work images from files, without PACS/ingest (no events are
    published for them, they have no DICOM UIDs). Gold images are never added as work. The input gate
    applies as to images from PACS: a file it refuses is not added (printed with the reason)."""
    from services.labeling.gold import IMAGE_SUFFIXES
    from services.labeling.models import Task, opaque_id

    async def _add(s: Any, job: Any, settings: Any) -> int:
        import random

        from sqlalchemy import select

        from services.labeling.intake import prepare_work_image

        known = set((await s.scalars(select(Task.source_path).where(Task.source_path.is_not(None)))).all())
        files = sorted(
            p.resolve()
            for folder in ("NORMAL", "PNEUMONIA")
            for p in (data / folder).iterdir()
            if p.suffix.lower() in IMAGE_SUFFIXES
        )
        random.Random(seed).shuffle(files)
        picked = [f for f in files if str(f) not in known][:n]
        with Progress(TextColumn("adding images"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
            bar = progress.add_task("add", total=len(picked))
            tasks = []
            for f in picked:  # gate and render first, with no write transaction open; insert all at the end
                task_id = opaque_id()
                prepared = prepare_work_image(
                    settings.render_dir(), task_id, f, settings.labeling_render_max_side, settings.resolved_gate_file()
                )
                progress.advance(bar)
                gate = prepared.gate
                if gate is not None and prepared.refused:
                    console.print(f"not added (input gate): {f.name}: {gate.reason}")
                    continue
                tasks.append(
                    Task(
                        id=task_id,
                        kind="work",
                        source_path=str(f),
                        job_key=job.key,
                        needed=job.redundancy.judgments_per_image,
                        gate_verdict=gate.verdict if gate else None,
                        gate_reason=(gate.reason or None) if gate else None,
                        gate_score=gate.score if gate else None,
                        gate_version=gate.version if gate else None,
                    )
                )
        s.add_all(tasks)
        return len(tasks)

    typer.echo(f"added {with_db(_add)} images")


@labeling.command("export")
def export_cmd(out: Path = typer.Option(..., help="output folder")) -> None:
    """Write the labeled dataset (labels.csv, labels.jsonl, judgments.csv) and the job report."""
    from services.labeling.export import export_dataset

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        progress.add_task("exporting", total=None)
        summary = with_db(lambda s, job, _settings: export_dataset(s, job, out))
    typer.echo(f"wrote {out}: {summary['images']} images, {summary['complete']} complete")


@labeling.command("export-job")
def export_job_cmd(
    out: Path = typer.Option(..., help="output folder"),
    format: str = typer.Option("appen", help="vendor format (appen)"),
) -> None:
    """Write the same job for a crowd vendor: CML form, instructions HTML, data CSV, test-question CSV."""
    from services.labeling.export import export_appen
    from services.labeling.render import cached_png, path_from_uri

    if format != "appen":
        raise typer.BadParameter("only 'appen' is supported")

    async def _export(s: Any, job: Any, settings: Any) -> dict[str, int]:
        def render(task: Any) -> Path:
            source = Path(task.source_path) if task.source_path else path_from_uri(task.storage_uri)
            return cached_png(settings.render_dir(), task.id, source, settings.labeling_render_max_side)

        return await export_appen(s, job, out, render)

    counts = with_db(_export)
    typer.echo(f"wrote {out}: {json.dumps(counts)}")


@labeling.command("report")
def report_cmd() -> None:
    """Print the job owner's summary (progress, agreement, annotators, contested gold, cost)."""
    from services.labeling.export import report_markdown
    from services.labeling.stats import job_summary

    summary = with_db(lambda s, job, _settings: job_summary(s, job))
    typer.echo(report_markdown(summary))


@labeling.command("simulate-crowd")
def simulate_crowd(
    url: str = typer.Option("http://127.0.0.1:8003"),
    annotators: str = typer.Option("expert:5,careless:3,adversarial:2,spammer:1", help="profile:count,..."),
    truth: list[Path] = typer.Option(..., help="folder(s) with NORMAL/ and PNEUMONIA/ images of known class"),
    password: str = typer.Option("sim-pass", help="password of the simulated annotators"),
    owner: str = typer.Option("owner", help="owner name (to read results)"),
    owner_password: str = typer.Option(..., help="owner password"),
    create_users: bool = typer.Option(True, help="create the annotators in the configured DB first"),
    seed: int = typer.Option(1),
    max_judgments: int = typer.Option(400, help="per annotator"),
    json_out: Path | None = typer.Option(None, help="also write the result as JSON"),
    difficulty: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help="CSV file,weak_margin (bench/data/labeling-difficulty.csv)"
    ),
) -> None:
    """Simulate annotators (difficulty-aware: expert, good, typical, biased, careless, adversarial,
    spammer) answering through the HTTP API."""
    from services.labeling.tools.crowd import TruthIndex, load_margins, parse_spec, simulate

    profiles = parse_spec(annotators)
    prefix = f"sim{seed}"
    if create_users:
        from sqlalchemy import select

        from services.core.auth import hash_password
        from services.labeling.models import User

        async def _users(s: Any, _job: Any, _settings: Any) -> None:
            hashed = hash_password(password)
            for i, p in enumerate(profiles):
                name = f"{prefix}-{p}-{i}"
                if await s.scalar(select(User).where(User.name == name)) is None:
                    s.add(User(name=name, role="annotator", password_hash=hashed))

        with_db(_users)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        progress.add_task("indexing known images", total=None)
        index = TruthIndex(list(truth))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        progress.add_task(f"{len(profiles)} simulated annotators at work", total=None)
        result = asyncio.run(
            simulate(
                url,
                profiles,
                password,
                index,
                (owner, owner_password),
                seed=seed,
                max_judgments=max_judgments,
                name_prefix=prefix,
                margins=load_margins(difficulty),
            )
        )
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    print_result(result)


def print_result(result: dict[str, Any]) -> None:
    out = Console()
    out.print(
        f"complete images {result['images']} (open {result['images_open']}): "
        f"accuracy Dawid-Skene (service) {result['accuracy_service_em']:.3f}, "
        f"majority vote {result['accuracy_majority_vote_all']:.3f} "
        f"(without stopped annotators {result['accuracy_majority_vote_active']:.3f}); "
        f"cost per final label {result['cost_per_final_label']} {result['currency']}"
    )
    table = Table("profile", "annotator", "quiz", "status", "trust", "gold acc", "judgments")
    for profile, rows in result["annotators"].items():
        for r in rows:
            table.add_row(
                profile,
                r["name"],
                str(r["quiz_passed"]),
                str(r["status"]),
                f"{r['trust']:.2f}" if r["trust"] is not None else "-",
                f"{r['gold_accuracy']:.2f}" if r["gold_accuracy"] is not None else "-",
                str(r["judgments"]),
            )
    out.print(table)
