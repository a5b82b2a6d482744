"""The one safe-redirect check after sign-in (services/core/login_routes.py), used by both web apps;
the apps' own sign-in pages are tested in tests/integration/test_web_security.py."""

from __future__ import annotations

import pytest

from services.core.login_routes import safe_next


@pytest.mark.parametrize(
    "target",
    [
        "",
        "worklist",
        "evil.example/x",
        "https://evil.example",
        "http:/evil.example",
        "javascript:alert(1)",
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\/evil.example",
        "/work\\..\\x",
        "/\t/evil.example",
        "/\r\n/evil.example",
        "/x\x00",
        "/x\x7f",
    ],
)
def test_off_site_or_odd_targets_fall_back(target: str) -> None:
    assert safe_next(target) == "/"
    assert safe_next(target, "/worklist") == "/worklist"


@pytest.mark.parametrize("target", ["/", "/worklist", "/studies/1.2.3?lane=all&flag=URGENT", "/work?fb=abc#top"])
def test_local_paths_are_kept(target: str) -> None:
    assert safe_next(target, "/worklist") == target
