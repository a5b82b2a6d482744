"""A throwaway PostgreSQL cluster for tests: services/system/postgres.py (shared with
`pneumotriage up --cluster` and the benchmarks), and a session fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.system.postgres import PostgresServer, as_postgres, pg_bin

# Names kept for the tests that import them.
PostgresCluster = PostgresServer
_as_postgres = as_postgres
_bin = pg_bin

__all__ = ["PostgresCluster", "PostgresServer", "postgres"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    cluster = PostgresServer().start()
    try:
        yield cluster
    finally:
        cluster.stop()
