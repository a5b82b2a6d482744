"""A throwaway PostgreSQL cluster for tests: harness/postgres.py (shared with
`./pt up --cluster` and the benchmarks), and a session fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.postgres import PostgresServer

# The name the tests import.
PostgresCluster = PostgresServer

__all__ = ["PostgresCluster", "PostgresServer", "postgres"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    cluster = PostgresServer().start()
    try:
        yield cluster
    finally:
        cluster.stop()
