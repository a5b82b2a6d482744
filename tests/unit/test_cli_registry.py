"""The `pneumotriage` command's explicit tables (services/cli.py): every service with a models.py has
its models in the `db` commands' table, and a name outside it is a user error, not a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from services.cli import SERVICE_MODELS, app

ROOT = Path(__file__).resolve().parents[2]


def test_every_service_database_is_in_the_db_table() -> None:
    with_models = {p.parent.name for p in (ROOT / "services").glob("*/models.py")}
    assert set(SERVICE_MODELS) == with_models
    for service, load in SERVICE_MODELS.items():
        tables = load().tables
        assert tables and all(name.startswith(f"{service}_") for name in tables), (service, sorted(tables))


def test_an_unknown_service_is_a_user_error() -> None:
    result = CliRunner().invoke(app, ["db", "upgrade", "inference"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "one of ingest, labeling, aggregator" in result.output
