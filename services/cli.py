"""The `pneumotriage` command: one sub-app per service, plus the whole-system commands.

Each service owns its commands in services/<service>/cli.py (a Typer app named `app`); this file
only mounts them, importing each lazily so that `pneumotriage --help` stays fast and a service's
heavy dependencies load only when its commands run.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="pneumotriage",
    help="PneumoTriage: triage of pediatric chest X-rays for pneumonia. A diagnostic aid, never a diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# (module, group name or None to mount its commands at the top level)
SUB_APPS: tuple[tuple[str, str | None], ...] = (
    ("services.core.cli", None),  # contracts, db
    ("services.ingest.cli", None),  # ingest, send, make-dicom
    ("services.inference.cli", None),  # inference, model ...
    ("services.labeling.cli", None),  # labeling ...
    ("services.aggregator.cli", None),  # aggregator, triage ...
    ("services.system.cli", None),  # up, demo
)

for module_name, group in SUB_APPS:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        continue
    app.add_typer(module.app, name=group)


if __name__ == "__main__":
    app()
