"""Shared Alembic environment: the caller (services.core.db.migrate) passes a live connection,
the service's metadata and its name; every service has its own version table."""

from __future__ import annotations

from alembic import context

config = context.config
service = config.attributes["service"]
connection = config.attributes.get("connection")
target_metadata = config.attributes.get("target_metadata")


def _include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    # Only this service's tables: others may live in the same database.
    if type_ == "table":
        return bool(name and name.startswith(f"{service}_"))
    return True


if connection is None:
    raise RuntimeError("run migrations through services.core.db.migrate (it passes the connection)")

context.configure(
    connection=connection,
    target_metadata=target_metadata,
    version_table=f"alembic_version_{service}",
    include_object=_include_object,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
