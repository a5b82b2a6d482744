"""Ingest commands: `pneumotriage ingest` (run the SCP), `pneumotriage send`, `pneumotriage make-dicom`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from services.ingest.transfer_syntaxes import RECIPES

app = typer.Typer()
ingest = typer.Typer(help="The DICOM ingest service (Storage SCP + outbox relay).", invoke_without_command=True)
app.add_typer(ingest, name="ingest")


# make-dicom's --transfer-syntax choices: the table's recipes (services/ingest/transfer_syntaxes.py)
Syntax = StrEnum("Syntax", {name.replace("-", "_"): name for name in RECIPES})


class Photometric(StrEnum):
    MONOCHROME1 = "MONOCHROME1"
    MONOCHROME2 = "MONOCHROME2"


class View(StrEnum):
    PA = "PA"
    AP = "AP"
    LL = "LL"


class Modality(StrEnum):
    DX = "DX"
    CR = "CR"


@ingest.callback()
def run_ingest(ctx: typer.Context) -> None:
    """Run the ingest service: DICOM SCP (PT_INGEST_PORT), outbox relay, /healthz + /metrics (PT_INGEST_HTTP_PORT)."""
    if ctx.invoked_subcommand is not None:
        return
    from services.ingest.app import main

    main()


@app.command("send")
def send(
    paths: list[Path] = typer.Argument(..., exists=True, help="DICOM files or folders (searched recursively)"),
    host: str = typer.Option("127.0.0.1", help="SCP host"),
    port: int = typer.Option(11112, help="SCP port"),
    called_ae: str = typer.Option("PNEUMOTRIAGE", "--called-ae", help="AE title of the SCP"),
    calling_ae: str = typer.Option("PT_SEND", "--calling-ae", help="our AE title"),
    timeout: float = typer.Option(60.0, help="network / DIMSE timeout, seconds"),
) -> None:
    """C-STORE DICOM files to an SCP, each in its own transfer syntax (files that are not DICOM are skipped
    with a count); exit 1 if any store failed, 2 if there was nothing to send."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from services.ingest.tools.send import collect_files, is_dicom_file, send_files

    console = Console(stderr=True)
    found = collect_files(paths)
    files = [f for f in found if is_dicom_file(f)]
    skipped = [f for f in found if f not in set(files)]
    if skipped:  # e.g. a LABELS.txt beside the images: not an error, said with a count
        names = ", ".join(f.name for f in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        console.print(f"skipped {len(skipped)} file(s) that are not DICOM (no DICOM file meta): {names}")
    if not files:
        console.print("no DICOM files to send")
        raise typer.Exit(2)
    with Progress(
        TextColumn("[bold]C-STORE"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("send", total=len(files))
        summary = send_files(
            files,
            host,
            port,
            called_ae,
            calling_ae,
            on_result=lambda _r: progress.advance(task),
            timeout=timeout,
        )
    table = Table(title=f"{len(files)} file(s) to {called_ae}@{host}:{port}")
    table.add_column("status")
    table.add_column("files", justify="right")
    for status, n in sorted(summary.by_status().items()):
        table.add_row(status, str(n))
    Console().print(table)
    for r in summary.failed[:20]:
        status = "not sent" if r.status is None else f"0x{r.status:04X}"
        console.print(f"[red]failed[/red] {r.path}: {status} {r.comment}")
    if summary.failed:
        raise typer.Exit(1)


@app.command("make-dicom")
def make_dicom_cmd(
    images: list[Path] = typer.Argument(..., exists=True, help="JPEG/PNG chest X-rays (or folders of them)"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    transfer_syntax: Syntax = typer.Option(Syntax("explicit"), "--transfer-syntax"),
    photometric: Photometric = typer.Option(Photometric.MONOCHROME2, "--photometric"),
    bits: int = typer.Option(8, "--bits", help="8, 12 or 16 bits stored"),
    view: View = typer.Option(View.PA, "--view"),
    modality: Modality = typer.Option(Modality.DX, "--modality"),
    for_processing: bool = typer.Option(False, "--for-processing", help="DX For Processing instead of Presentation"),
    age: str = typer.Option("005Y", "--age", help="PatientAge, DICOM AS (e.g. 005Y, 018M)"),
    patient_name: str | None = typer.Option(None, "--patient-name"),
    size: int | None = typer.Option(None, "--size", help="resample to SIZE x SIZE pixels"),
    uid_salt: str = typer.Option("", "--uid-salt", help="make distinct UIDs for otherwise identical inputs"),
    study_date: str | None = typer.Option(
        None, "--study-date", help="YYYYMMDD for study/series/acquisition dates (default: today, a fresh study)"
    ),
) -> None:
    """Wrap chest X-ray images as realistic DX/CR DICOM in a chosen transfer syntax."""
    from rich.progress import track

    from services.ingest.tools.make_dicom import DicomOptions, make_dicom_file

    files: list[Path] = []
    for p in images:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
        else:
            files.append(p)
    opts = DicomOptions(
        transfer_syntax=transfer_syntax.value,
        photometric=photometric.value,
        bits=bits,
        view=view.value,
        modality=modality.value,
        intent="processing" if for_processing else "presentation",
        age=age,
        patient_name=patient_name,
        **({"study_date": study_date} if study_date else {}),
        size=size,
        uid_salt=uid_salt,
    )
    try:
        opts.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    for f in track(files, description="make-dicom", transient=len(files) < 2):
        make_dicom_file(f, out, opts)
    typer.echo(f"wrote {len(files)} file(s) to {out}")
