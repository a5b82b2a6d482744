"""What the code really defines, for checking deployment files against it: every PT_* setting,
every CLI command, every Prometheus metric name, each service's default HTTP port."""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache
from pathlib import Path

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("ingest", "inference", "labeling", "aggregator")
SETTINGS_MODULES = ("services.core.settings", "services.core.auth", *(f"services.{s}.config" for s in SERVICES))


@cache
def settings_classes() -> tuple[type[BaseSettings], ...]:
    found: list[type[BaseSettings]] = []
    for name in SETTINGS_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseSettings) and obj is not BaseSettings and obj not in found:
                found.append(obj)
    return tuple(found)


@cache
def env_var_names() -> frozenset[str]:
    """Every environment variable some settings class reads (prefix + field name)."""
    names: set[str] = set()
    for cls in settings_classes():
        for field_name, field in cls.model_fields.items():
            names.update(_field_env_names(cls, field_name, field))
    return frozenset(names)


def _field_env_names(cls: type[BaseSettings], field_name: str, field: FieldInfo) -> set[str]:
    """prefix + name, or the field's explicit alias(es) when it has them."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return {str(c).upper() for c in alias.choices if isinstance(c, str)}
    if isinstance(alias, str):
        return {alias.upper()}
    return {str(cls.model_config.get("env_prefix", "")).upper() + field_name.upper()}


def settings_default(env_name: str) -> object:
    """The default value of the setting read from env_name."""
    for cls in settings_classes():
        for field_name, field in cls.model_fields.items():
            if env_name in _field_env_names(cls, field_name, field):
                return field.default
    raise KeyError(env_name)


@cache
def cli_commands() -> frozenset[str]:
    """Top-level `pneumotriage` commands and groups."""
    import typer

    from services.cli import app

    group = typer.main.get_command(app)
    return frozenset(group.commands)  # type: ignore[attr-defined]


@cache
def metric_names() -> frozenset[str]:
    """Prometheus metric families defined in services/ (plus the suffixes prometheus-client adds)."""
    names: set[str] = set()
    pattern = re.compile(r"\b(Counter|Histogram|Gauge|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")
    for path in (REPO / "services").rglob("*.py"):
        for kind, name in pattern.findall(path.read_text(errors="replace")):
            names.add(name)
            if kind == "Counter":
                names.add(name if name.endswith("_total") else name + "_total")
            if kind in ("Histogram", "Summary"):
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return frozenset(names)
