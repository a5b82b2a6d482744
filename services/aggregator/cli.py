"""CLI: `pneumotriage aggregator` (run the service), `pneumotriage aggregator add-user`, and the
`pneumotriage triage` group (calibrate, evaluate, export-reviews, recalibrate, rescore)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import typer

app = typer.Typer()
aggregator = typer.Typer(
    help="The aggregator: fuses model and crowd into triage flags; clinician worklist on PT_AGGREGATOR_HTTP_PORT.",
    invoke_without_command=True,
)
triage = typer.Typer(
    help="Triage policy: calibrate thresholds and fusion weights, evaluate, export reviews, re-score a withdrawn model."
)
app.add_typer(aggregator, name="aggregator")
app.add_typer(triage, name="triage")


@aggregator.callback()
def run_service(ctx: typer.Context) -> None:
    """Run the aggregator (consumer + outbox relay + SR sender + web) until SIGINT/SIGTERM."""
    if ctx.invoked_subcommand is not None:
        return
    from services.aggregator.app import main

    main()


@aggregator.command("add-user")
def add_user(
    name: str = typer.Argument(..., help="user name (sign-in name)"),
    role: str = typer.Option("clinician", "--role", help="clinician | admin"),
    password: str = typer.Option(..., "--password", prompt=True, hide_input=True, confirmation_prompt=True),
) -> None:
    """Create a worklist user, or reset their password and role."""
    if role not in ("clinician", "admin"):
        raise typer.BadParameter("role must be clinician or admin", param_hint="--role")
    from services.aggregator.users import upsert_user

    created = asyncio.run(upsert_user(name, role, password))
    typer.echo(f"{'created' if created else 'updated'} {role} {name}")


def _print_report(title: str, report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: {report['images']} images, pneumonia prevalence {report['prevalence']}")
    for col in ("flag", "count", "share", "sensitivity", "specificity", "PPV", "NPV", "pneumonia rate"):
        table.add_column(col)

    def f(v: Any) -> str:
        return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for flag, e in report["flags"].items():
        table.add_row(
            flag,
            f(e["count"]),
            f(e["share"]),
            f(e.get("sensitivity")),
            f(e.get("specificity")),
            f(e.get("ppv")),
            f(e.get("npv")),
            f(e.get("pneumonia_rate")),
        )
    Console().print(table)
    Console().print(f"score: {report.get('score')}")


@triage.command("calibrate")
def calibrate_cmd(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="labeled images, JSON lines"),
    out: Path = typer.Option(None, "--out", help="policy file to write (default: PT_AGGREGATOR_POLICY_FILE)"),
    held_out: float = typer.Option(0.3, "--held-out", min=0.0, max=0.9, help="share of groups kept for evaluation"),
    seed: int = typer.Option(0, "--seed"),
    rule_out_sensitivity: float = typer.Option(0.95, "--rule-out-sensitivity"),
    urgent_ppv: float = typer.Option(0.90, "--urgent-ppv"),
    suspected_ppv: float = typer.Option(0.85, "--suspected-ppv"),
    prevalence: float | None = typer.Option(
        None, "--prevalence", help="pneumonia prevalence to state PPV/NPV for (default: the data's own)"
    ),
    report_json: Path | None = typer.Option(None, "--report", help="also write the full report as JSON"),
) -> None:
    """Fit the fusion weights and choose thresholds for the stated operating points; report fit and held-out numbers."""
    from services.aggregator.config import AggregatorSettings
    from services.aggregator.tools.calibrate import OperatingPoints, calibrate, load_jsonl

    target = out or AggregatorSettings().policy_file
    images = load_jsonl(data)
    ops = OperatingPoints(rule_out_sensitivity, urgent_ppv, suspected_ppv)
    result = calibrate(images, ops, held_out=held_out, seed=seed, prevalence=prevalence)
    result.policy.meta["data"] = data.name
    header = (
        "# Written by `pneumotriage triage calibrate` — do not hand-edit; re-run calibrate instead.\n"
        f"# data: {data.name}, {len(images)} images; see docs/triage-policy.md"
    )
    result.policy.save(target, header)
    t = result.policy.thresholds
    typer.echo(f"wrote {target}")
    typer.echo(f"thresholds: urgent >= {t.urgent:.4f}, suspected >= {t.suspected:.4f}, rule-out <= {t.rule_out:.4f}")
    typer.echo(f"fusion: {json.dumps(result.policy.fusion.to_dict()['weights'])}")
    _print_report("fit", result.fit_report)
    if result.held_out_report:
        _print_report("held out", result.held_out_report)
    if report_json:
        report_json.write_text(json.dumps(result.policy.to_dict(), indent=2))


@triage.command("evaluate")
def evaluate_cmd(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False),
    policy_file: Path = typer.Option(None, "--policy", help="default: PT_AGGREGATOR_POLICY_FILE"),
    prevalence: float | None = typer.Option(None, "--prevalence"),
) -> None:
    """Apply a policy file to labeled images and print per-flag numbers."""
    from services.aggregator.config import AggregatorSettings
    from services.aggregator.policy import Policy
    from services.aggregator.tools.calibrate import evaluate, load_jsonl

    policy = Policy.load(policy_file or AggregatorSettings().policy_file)
    _print_report(data.name, evaluate(policy, load_jsonl(data), prevalence))


@triage.command("export-reviews")
def export_reviews(out: Path = typer.Option(..., "--out", help="JSON lines, one clinician label per line")) -> None:
    """Export clinician confirms/overrules as high-trust labels for the labeling/ML side."""
    from services.aggregator.users import all_reviews

    if not out.parent.is_dir():  # checked before reading the database: a mistake is said at once
        typer.echo(f"error: the folder {out.parent} does not exist", err=True)
        raise typer.Exit(2)
    rows = asyncio.run(all_reviews())
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(f"wrote {len(rows)} reviews to {out}")


@triage.command("export-labels")
def export_labels_cmd(
    out: Path = typer.Option(..., "--out", help="a new (or empty) folder: NORMAL/ PNEUMONIA/ + labels.jsonl"),
    crowd: bool = typer.Option(False, "--crowd/--no-crowd", help="also the crowd's confident consensus"),
    crowd_confidence: float = typer.Option(0.95, "--crowd-confidence", help="with --crowd: the consensus needed"),
) -> None:
    """The site's confirmed labels as a folder of links to the stored DICOM files, for
    `pneumotriage model adapt --data` (list it first: clinician labels outrank crowd ones)."""
    from services.aggregator.config import AggregatorSettings
    from services.aggregator.tools.label_export import ExportError, check_output, labelled_images, write_export
    from services.core.db import make_engine, make_sessionmaker

    settings = AggregatorSettings()

    async def rows() -> list[dict]:
        engine = make_engine(settings.database_url_for("aggregator"))
        try:
            async with make_sessionmaker(engine)() as session:
                return await labelled_images(session, crowd, crowd_confidence)
        finally:
            await engine.dispose()

    try:
        check_output(out)  # said at once, before the database is read
        result = write_export(out, asyncio.run(rows()))
    except ExportError as exc:
        typer.echo(f"error: {exc}; nothing written", err=True)
        raise typer.Exit(2) from exc
    missing = f"; {result.missing_files} labelled images without their stored file" if result.missing_files else ""
    typer.echo(f"wrote {result.written} ({result.by_source}) to {out}{missing}")
    typer.echo(f"next: pneumotriage model adapt --site <name> --base-version <N> --data {out}")


@triage.command("recalibrate")
def recalibrate_cmd(
    min_labels: int = typer.Option(100, "--min-labels", help="refuse to fit with fewer confirmed labels"),
    min_per_class: int = typer.Option(20, "--min-per-class", help="... or fewer of either class"),
    crowd_confidence: float = typer.Option(0.95, "--crowd-confidence", help="crowd consensus counts from here"),
    bootstrap: int = typer.Option(200, "--bootstrap", help="bootstrap resamples for the 95 % intervals"),
    seed: int = typer.Option(0, "--seed"),
    rule_out_confidence: float = typer.Option(
        0.8,
        "--rule-out-confidence",
        min=0.0,
        max=0.99,
        help="the rule-out keeps sensitivity 0.95 on new images with this confidence (0: on the labels only)",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="fit and report, write nothing"),
    rollback: bool = typer.Option(False, "--rollback", help="activate the previously active version"),
    off: bool = typer.Option(False, "--off", help="use the model's own calibration and the policy file again"),
    activate_version: int | None = typer.Option(None, "--activate", help="activate this version"),
    list_versions: bool = typer.Option(False, "--list", help="list the versions and the active one"),
) -> None:
    """Refit the model's probabilities (Platt) and the thresholds from this site's confirmed labels
    (clinician reviews, high-trust crowd consensus); versioned, with roll-back. Restart the
    aggregator to apply."""
    from services.aggregator import site_calibration as sc
    from services.aggregator.config import AggregatorSettings
    from services.aggregator.policy import Policy
    from services.aggregator.tools import recalibrate as rc
    from services.aggregator.tools.calibrate import OperatingPoints

    settings = AggregatorSettings()
    directory = settings.resolved_site_calibration_dir()
    if list_versions:
        active = sc.active_version(directory)
        for v in sc.versions(directory):
            cal = sc.load_version(directory, v)
            mark = "*" if v == active else " "
            typer.echo(
                f"{mark} v{v}  {cal.created_at}  model {cal.model_name} v{cal.model_version}  "
                f"labels {cal.meta.get('labels')}  a={cal.a:.3f} b={cal.b:.3f}  "
                f"rule-out <= {cal.thresholds.rule_out:.3f}"
            )
        typer.echo(f"active: {'none (model calibration)' if active is None else f'v{active}'}")
        return
    if rollback or off or activate_version is not None:
        try:
            if rollback:
                now = sc.rollback(directory)
            else:
                now = None if off else activate_version
                sc.activate(directory, now)
        except ValueError as exc:  # nothing active to roll back, no such version: nothing changed
            have = ", ".join(f"v{v}" for v in sc.versions(directory)) or "none"
            typer.echo(f"error: {exc} (versions: {have}); nothing changed", err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"active site calibration: {'none (model calibration)' if now is None else f'v{now}'}")
        typer.echo("restart the aggregator to apply")
        return

    async def labels() -> list[rc.SiteLabel]:
        from services.core.db import make_engine, make_sessionmaker

        engine = make_engine(settings.database_url_for("aggregator"))
        try:
            async with make_sessionmaker(engine)() as session:
                return await rc.collect_labels(session, crowd_confidence)
        finally:
            await engine.dispose()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(), transient=True) as progress:
        task = progress.add_task("reading confirmed labels", total=None)
        found = asyncio.run(labels())
        progress.update(task, total=1, completed=1)
        policy = Policy.load(settings.policy_file)
        resamples = progress.add_task("fit + bootstrap resamples", total=bootstrap)
        try:
            cal = rc.fit_site_calibration(
                found,
                policy,
                OperatingPoints(rule_out_confidence=rule_out_confidence),
                min_labels,
                min_per_class,
                bootstrap=bootstrap,
                seed=seed,
                on_resample=lambda: progress.advance(resamples),
            )
        except rc.NotEnoughLabels as exc:
            progress.stop()
            typer.echo(f"not recalibrated: {exc}", err=True)
            raise typer.Exit(2) from exc
    m = cal.meta
    typer.echo(f"model {cal.model_name} v{cal.model_version}: {m['labels']} labels {m['sources']}")
    typer.echo(f"Platt: P = sigmoid({cal.a:.3f} * logit + {cal.b:.3f})  95% CI a {m['ci95_bootstrap']['a']}")
    t = cal.thresholds
    typer.echo(f"thresholds: urgent >= {t.urgent:.4f}, suspected >= {t.suspected:.4f}, rule-out <= {t.rule_out:.4f}")
    typer.echo(f"rule-out on these labels, before: {m['before_on_same_labels']}  after: {m['fit']}")
    typer.echo(
        f"out-of-bag 95% CI: sensitivity {m['ci95_bootstrap']['sensitivity']}, "
        f"specificity {m['ci95_bootstrap']['specificity']}"
    )
    if dry_run:
        return
    path = sc.save_new_version(directory, cal)
    typer.echo(f"wrote {path} (active); restart the aggregator to apply; `--rollback` undoes it")


@triage.command("rescore")
def rescore_cmd(
    model_version: str = typer.Option(..., "--model-version", help="the withdrawn version whose studies to re-score"),
    reason: str = typer.Option("", "--reason", help="why (goes into every re-scored study's audit trail)"),
    model_name: str = typer.Option("", "--model-name", help="only this model's predictions (default: any)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be re-scored, send nothing"),
) -> None:
    """Re-score the studies a withdrawn model version judged: inference predicts their images again
    with the version it serves now, and the aggregator re-flags them, the audit trail saying why.
    Roll back and restart inference first (`model deploy --version <previous>`). Studies a clinician
    confirmed or overruled keep the clinician's flag and are listed here for review."""
    from services.aggregator.config import AggregatorSettings
    from services.aggregator.tools import rescore as rs
    from services.core.db import make_engine, make_sessionmaker

    settings = AggregatorSettings()
    version = model_version.strip().removeprefix("v")
    why = reason.strip() or f"model version {version} withdrawn"

    async def plan() -> rs.RescorePlan:
        engine = make_engine(settings.database_url_for("aggregator"))
        try:
            async with make_sessionmaker(engine)() as session:
                return await rs.plan_rescore(session, version, model_name)
        finally:
            await engine.dispose()

    found = asyncio.run(plan())
    if not found.targets:
        typer.echo(f"no study rests on a prediction of model version {version}: nothing to re-score")
        if found.unreadable:
            typer.echo(f"({found.unreadable} judged images have no stored file)")
        return
    typer.echo(
        f"model version {version} judged {len(found.targets)} images in {len(found.studies)} studies"
        f" (their current predictions); reason: {why}"
    )
    if found.unreadable:
        typer.echo(f"{found.unreadable} more judged images have no stored file and cannot be re-scored")
    if found.reviewed:
        typer.echo(
            f"{len(found.reviewed)} of these studies carry a clinician's flag: it stays (the new opinion is"
            " recorded beside it); review them:"
        )
        for study_uid, flag, by in found.reviewed:
            typer.echo(f"  {study_uid}  {flag}  (set by {by})")
    if dry_run:
        typer.echo("dry run: nothing sent")
        return
    items = rs.requests(found, why)
    try:
        confirmed = asyncio.run(rs.publish(settings.amqp_url, settings.exchange, settings.quorum_queues, items))
    except Exception as exc:  # the broker unreachable: a clear line, nothing half-said
        typer.echo(f"error: could not reach the broker at {settings.amqp_url.split('@')[-1]}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"asked inference to re-score {confirmed} of {len(items)} images (rescore.requested, request"
        f" {items[0].message_id.split(':')[1]}); the worklist follows as the new predictions arrive"
    )
    if confirmed < len(items):
        typer.echo(f"error: {len(items) - confirmed} requests were not confirmed by the broker: run it again", err=True)
        raise typer.Exit(1)
