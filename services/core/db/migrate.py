"""Alembic, one history per service.

The shared env.py lives in services/core/db/alembic; each service keeps its revisions in
services/<service>/migrations/ and records them in its own version table
(alembic_version_<service>). `upgrade()` runs inside the service's event loop on an async engine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

SERVICES_DIR = Path(__file__).resolve().parents[2]
SCRIPT_LOCATION = Path(__file__).resolve().parent / "alembic"


def alembic_config(service: str, metadata: MetaData | None = None, versions_dir: Path | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("version_locations", str(versions_dir or SERVICES_DIR / service / "migrations"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["service"] = service
    cfg.attributes["target_metadata"] = metadata
    return cfg


async def upgrade(
    engine: AsyncEngine, service: str, metadata: MetaData, revision: str = "head", versions_dir: Path | None = None
) -> None:
    """Bring the service's tables to `revision` (idempotent; safe on every start)."""

    def _run(connection: Connection) -> None:
        cfg = alembic_config(service, metadata, versions_dir)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together: one runs the migrations, the others wait here for its
            # commit and then find nothing to do. A transaction-scoped advisory lock per service
            # (released at commit/rollback, also when the process dies).
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": migration_lock_key(service)})
        await conn.run_sync(_run)


def migration_lock_key(service: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock, one per service's history."""
    digest = hashlib.blake2b(f"pneumotriage-migrations:{service}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def make_revision(
    engine: AsyncEngine, service: str, metadata: MetaData, message: str, versions_dir: Path | None = None
) -> None:
    """Autogenerate a new revision for the service from the difference between models and DB."""

    def _run(connection: Connection) -> None:
        cfg = alembic_config(service, metadata, versions_dir)
        cfg.attributes["connection"] = connection
        command.revision(cfg, message=message, autogenerate=True)

    async with engine.begin() as conn:
        await conn.run_sync(_run)
