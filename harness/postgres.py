"""A throwaway PostgreSQL server (Debian's postgresql package) on a loopback port.

Used by `./pt up --cluster`, the multi-node test harness and the benchmarks. `initdb` and
`pg_ctl` run as user `postgres` when we are root (PostgreSQL refuses to run as root), in a
directory that user owns (see ../shared/RUNTIME-NOTES.md).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from services.core.net import free_port


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
    return found[-1]


def as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    """initdb + pg_ctl in a temp dir; `url` is what PT_DATABASE_URL takes (asyncpg driver)."""

    def __init__(self, base_dir: Path | None = None, port: int | None = None, database: str = "pt") -> None:
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="pt-pg-"))
        self.port = port or free_port()
        self.data = self.dir / "data"
        self.database = database

    def _run(self, cmd: list[str], timeout: float = 120.0) -> None:
        subprocess.run(as_postgres(cmd), check=True, capture_output=True, timeout=timeout)

    def start(self) -> PostgresServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._run([pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"])
            fresh = True
        else:
            fresh = False
        self.start_server()
        if fresh:
            self._run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.database])
        return self

    def start_server(self) -> None:
        """pg_ctl start (waits until it accepts connections); fsync and synchronous_commit stay on."""
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=300"
        self._run(
            [pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o", opts, "start"]
        )

    def stop_server(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` cuts every connection (what a DB restart looks like to the services)."""
        self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop_server("fast")
        self.start_server()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """The same database for asyncpg / psql."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def stop(self, keep_data: bool = False) -> None:
        subprocess.run(
            as_postgres([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]), capture_output=True
        )
        if not keep_data:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
