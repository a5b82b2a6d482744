"""The README stays true: its two commands exist, CI runs the test one, and its configuration
table matches the settings the code reads (names and defaults)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from pydantic_settings import BaseSettings

from harness.config import SystemSettings
from harness.system_config_refs import _field_env_names, settings_classes

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
ROW = re.compile(r"^\| `(PT_[A-Z0-9_]+)` \| ([^|]+(?:\\\|[^|]*)*) \|", re.M)


def _code_settings() -> dict[str, object]:
    """env var -> default, for each field a settings class declares itself (not inherited ones)."""
    out: dict[str, object] = {}
    classes: list[type[BaseSettings]] = [*settings_classes(), SystemSettings]
    for cls in classes:
        own = [n for n in cls.model_fields if n in inspect.get_annotations(cls)]
        for name in own:
            field = cls.model_fields[name]
            for env in _field_env_names(cls, name, field):
                out.setdefault(env, field.default)
    return out


def test_two_commands_and_ci() -> None:
    assert "./pt up" in README and "./pt test" in README
    pt = (REPO / "pt").read_text()
    assert "\n  up)" in pt and "\n  test)" in pt
    assert "./pt test" in (REPO / ".ci" / "run").read_text()


def test_configuration_table_matches_the_code() -> None:
    documented = {m.group(1): m.group(2).strip() for m in ROW.finditer(README)}
    code = _code_settings()
    assert set(documented) - set(code) == set(), "README documents settings the code does not read"
    assert set(code) - set(documented) == set(), "settings missing from the README configuration table"
    for env, default in code.items():
        shown = documented[env].strip("`").replace("\\|", "|")
        if default is None or default == "":
            continue  # "unset" or a derived default described in words
        if isinstance(default, Path):
            assert shown.endswith(default.name) or shown.startswith("<"), (env, shown, default)
        elif isinstance(default, int | float) and not isinstance(default, bool):
            assert float(shown) == default, (env, shown, default)
        else:
            assert shown == str(default), (env, shown, default)
