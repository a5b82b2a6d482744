"""Worklist users and review export, for the CLI (the service reads the same tables)."""

from __future__ import annotations

from typing import Any

from services.aggregator.config import AggregatorSettings
from services.aggregator.models import Base, User
from services.core.auth import hash_password
from services.core.db import make_engine, make_sessionmaker, upgrade


async def upsert_user(name: str, role: str, password: str, settings: AggregatorSettings | None = None) -> bool:
    """Create the user (True) or update their role and password (False)."""
    settings = settings or AggregatorSettings()
    engine = make_engine(settings.database_url_for("aggregator"))
    try:
        await upgrade(engine, "aggregator", Base.metadata)
        async with make_sessionmaker(engine)() as s:
            user = await s.get(User, name)
            created = user is None
            if user is None:
                user = User(username=name, role=role, password_hash=hash_password(password))
                s.add(user)
            else:
                user.role, user.password_hash = role, hash_password(password)
            await s.commit()
        return created
    finally:
        await engine.dispose()


async def all_reviews(settings: AggregatorSettings | None = None) -> list[dict[str, Any]]:
    from services.aggregator.web.queries import reviews

    settings = settings or AggregatorSettings()
    engine = make_engine(settings.database_url_for("aggregator"))
    try:
        await upgrade(engine, "aggregator", Base.metadata)
        async with make_sessionmaker(engine)() as s:
            out: list[dict[str, Any]] = []
            page = 1
            while True:
                items, total = await reviews(s, page, 1000)
                out.extend(items)
                if len(out) >= total or not items:
                    return out
                page += 1
    finally:
        await engine.dispose()
