"""Developer commands for the shared kernel: contracts generation, database migrations (`db_app`,
mounted by services/cli.py with its table of service models) and the backlog `status`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sqlalchemy import MetaData

app = typer.Typer()
contracts = typer.Typer(help="Protobuf message contracts (proto/pneumotriage/v1).", no_args_is_help=True)
app.add_typer(contracts, name="contracts")


@contracts.command("generate")
def generate_contracts() -> None:
    """Regenerate services/core/contracts/ from proto/ (needs the [dev] extra: grpcio-tools)."""
    from services.core.contracts.generate import generate

    for path in generate():
        typer.echo(f"wrote {path}")


# A service's models' metadata (services/<service>/models.py `Base.metadata`), imported only when a
# db command runs.
ModelsLoader = Callable[[], "MetaData"]


def db_app(models: Mapping[str, ModelsLoader]) -> typer.Typer:
    """The `db` commands over an explicit table of the services that have a database (name -> its
    models' metadata). The table lives with the `pneumotriage` command (services/cli.py): the
    kernel imports no service."""
    db = typer.Typer(help="Database migrations (one Alembic history per service).", no_args_is_help=True)

    def metadata_of(service: str) -> MetaData:
        if service not in models:
            raise typer.BadParameter(f"one of {', '.join(models)}", param_hint="SERVICE")
        return models[service]()

    @db.command("revision")
    def db_revision(
        service: str = typer.Argument(..., help=" | ".join(models)),
        message: str = typer.Option(..., "-m", "--message"),
    ) -> None:
        """Autogenerate a migration for SERVICE from services/<service>/models.py (Base) vs. its DB."""
        import asyncio
        import tempfile

        from services.core.db.engine import make_engine
        from services.core.db.migrate import make_revision, upgrade

        metadata = metadata_of(service)
        with tempfile.TemporaryDirectory() as scratch:
            # diff the models against a scratch database brought to the current head
            engine = make_engine(f"sqlite+aiosqlite:///{scratch}/scratch.db")

            async def _run() -> None:
                await upgrade(engine, service, metadata)
                await make_revision(engine, service, metadata, message)
                await engine.dispose()

            asyncio.run(_run())

    @db.command("upgrade")
    def db_upgrade(service: str = typer.Argument(..., help=" | ".join(models))) -> None:
        """Apply SERVICE's migrations to the configured database (services also do this at start)."""
        import asyncio

        from services.core.db.engine import make_engine
        from services.core.db.migrate import upgrade
        from services.core.settings import CommonSettings

        metadata = metadata_of(service)
        engine = make_engine(CommonSettings().database_url_for(service))

        async def _run() -> None:
            await upgrade(engine, service, metadata)
            await engine.dispose()

        asyncio.run(_run())

    return db


@app.command("status")
def status(
    watch: bool = typer.Option(False, "--watch", help="redraw every --interval seconds until Ctrl-C"),
    interval: float = typer.Option(2.0, "--interval", min=0.2),
    metrics: list[str] = typer.Option(
        None, "--metrics", help="a service's /metrics URL (repeatable); default: the local services' ports"
    ),
    amqp_url: str = typer.Option("", "--amqp-url", help="default: PT_AMQP_URL"),
) -> None:
    """Backlog per stage and lane (fresh | backfill): waiting, oldest, drain rate, ETA, a progress bar."""
    import asyncio

    from services.core import status as st
    from services.core.settings import CommonSettings

    url = amqp_url or CommonSettings().amqp_url
    urls = tuple(metrics) if metrics else st.DEFAULT_METRICS
    table = st.rows()

    async def run() -> None:
        while True:
            await st.sample(url, table, urls)
            if watch:
                typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the terminal
            typer.echo(st.render(table))
            if not watch:
                return
            await asyncio.sleep(interval)  # the refresh interval

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
