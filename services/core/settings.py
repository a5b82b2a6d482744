"""Configuration shared by every service, read from the environment (prefix PT_) or a .env file.

Each service subclasses CommonSettings with its own fields (e.g. PT_INGEST_PORT); the README's
configuration table lists them all.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PT_", env_file=".env", extra="ignore")

    # Where local state lives: SQLite databases, the image store, rendered caches.
    data_dir: Path = Path("var")
    # The image store (content-addressed DICOM files); defaults to <data_dir>/store.
    store_dir: Path | None = None
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchange: str = "triage"
    # Use quorum queues (RabbitMQ cluster) instead of classic durable queues.
    quorum_queues: bool = False
    # One URL for every service (PostgreSQL: postgresql+asyncpg://...). Unset: one SQLite file per
    # service under data_dir. Services keep their own tables (prefixed) and migration history.
    database_url: str | None = None
    log_level: str = "INFO"
    log_json: bool = True
    http_host: str = "127.0.0.1"

    def resolved_store_dir(self) -> Path:
        return self.store_dir or self.data_dir / "store"

    def database_url_for(self, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{service}.db').resolve()}"
