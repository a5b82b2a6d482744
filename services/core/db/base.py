"""A declarative base per service: each service owns its tables (prefixed with its name) and its
own Alembic history, so four services can share one PostgreSQL database or use one SQLite each."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def make_base(service: str) -> type[DeclarativeBase]:
    """Return a fresh DeclarativeBase whose metadata is tagged with the owning service."""

    class Base(DeclarativeBase):
        metadata = MetaData(naming_convention=NAMING_CONVENTION, info={"service": service})

    Base.__name__ = f"{service.capitalize()}Base"
    return Base
