"""Database kernel: async engine + sessions, a declarative base per service, the transactional
outbox and Alembic migrations (one history per service, see migrate.py)."""

from services.core.db.engine import make_engine, make_sessionmaker
from services.core.db.migrate import upgrade

__all__ = ["make_engine", "make_sessionmaker", "upgrade"]
