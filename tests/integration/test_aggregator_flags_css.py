"""The badge colours come from the flag registry: /flags.css serves `flags.css()` (same origin, so
the CSP's `style-src 'self'` allows it) and every page loads it after /static/app.css."""

from __future__ import annotations

import contextlib

import httpx

from services.aggregator.flags import REGISTRY, css
from services.aggregator.service import Aggregator
from services.aggregator.web.app import create_app
from tests.support.aggregator_service import offline_aggregator_fixture  # noqa: F401


async def test_flags_css_is_served_from_the_registry_and_linked(offline_aggregator: Aggregator) -> None:
    app = create_app(offline_aggregator)
    transport = httpx.ASGITransport(app=app)
    async with contextlib.aclosing(httpx.AsyncClient(transport=transport, base_url="http://aggregator")) as client:
        res = await client.get("/flags.css")  # no session: the sign-in page needs it too
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/css")
        assert res.text == css()
        assert all(f".badge.flag-{f.name} " in res.text for f in REGISTRY)
        page = (await client.get("/login")).text
        assert page.index('href="/static/app.css"') < page.index('href="/flags.css"')
