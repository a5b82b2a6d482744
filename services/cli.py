"""The `pneumotriage` command: one sub-app per service, plus the kernel's `contracts`, `status` and `db`.

Each service owns its commands in services/<service>/cli.py (a Typer app named `app`); this file
mounts them from an explicit table, and gives the kernel's `db` commands the table of the services'
models (imported only when a db command runs). The service CLI modules import their heavy
dependencies (torch, onnxruntime, pydicom ...) inside their commands, so that `pneumotriage --help`
stays fast and optional extras stay optional. Running the whole system on one machine (`./pt up`,
`./pt demo`) is a development harness (harness/cli.py), not part of the installed package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from services.aggregator import cli as aggregator_cli
from services.core import cli as core_cli
from services.inference import cli as inference_cli
from services.ingest import cli as ingest_cli
from services.labeling import cli as labeling_cli

if TYPE_CHECKING:
    from sqlalchemy import MetaData

app = typer.Typer(
    name="pneumotriage",
    help="PneumoTriage: triage of pediatric chest X-rays for pneumonia. A diagnostic aid, never a diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def ingest_models() -> MetaData:
    from services.ingest.models import Base

    return Base.metadata


def labeling_models() -> MetaData:
    from services.labeling.models import Base

    return Base.metadata


def aggregator_models() -> MetaData:
    from services.aggregator.models import Base

    return Base.metadata


# The services with a database (inference has none): `pneumotriage db revision|upgrade SERVICE`.
SERVICE_MODELS: dict[str, core_cli.ModelsLoader] = {
    "ingest": ingest_models,
    "labeling": labeling_models,
    "aggregator": aggregator_models,
}

# Every sub-app's commands are mounted at the top level, in this order (as `--help` lists them).
app.add_typer(core_cli.app)  # contracts, status
app.add_typer(core_cli.db_app(SERVICE_MODELS), name="db")
app.add_typer(ingest_cli.app)  # ingest, send, make-dicom
app.add_typer(inference_cli.app)  # inference, model ...
app.add_typer(labeling_cli.app)  # labeling ...
app.add_typer(aggregator_cli.app)  # aggregator, triage ...


if __name__ == "__main__":
    app()
