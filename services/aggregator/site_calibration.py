"""A site's calibration as the running aggregator reads it: Platt parameters of the model's logit and
the triage thresholds fitted on this site's confirmed labels, one YAML file per version in
``PT_AGGREGATOR_SITE_CALIBRATION_DIR`` and an ``ACTIVE`` file naming the one in use (``none`` = the
model's own calibration and the policy file).

The aggregator reads the active version when it starts (`load_active`). The fitting itself is
offline tooling: `pneumotriage triage recalibrate` (services/aggregator/tools/recalibrate.py) writes
the versions with `save_new_version`; `--rollback`, `--activate` and `--off` use `rollback` and
`activate` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.aggregator.policy import Thresholds
from services.core.calibration import sigmoid

ACTIVE_FILE = "ACTIVE"


@dataclass
class SiteCalibration:
    version: int
    model_name: str
    model_version: str
    a: float
    b: float
    thresholds: Thresholds
    created_at: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def probability(self, logit: float) -> float:
        return sigmoid(self.a * logit + self.b)

    def applies_to(self, model_name: str, model_version: str) -> bool:
        return (model_name, model_version) == (self.model_name, self.model_version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "platt": {"a": self.a, "b": self.b},
            "thresholds": {k: float(v) for k, v in vars(self.thresholds).items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiteCalibration:
        return cls(
            version=int(d["version"]),
            model_name=str(d["model_name"]),
            model_version=str(d["model_version"]),
            a=float(d["platt"]["a"]),
            b=float(d["platt"]["b"]),
            thresholds=Thresholds(**{k: float(v) for k, v in dict(d["thresholds"]).items()}),
            created_at=str(d.get("created_at", "")),
            meta=dict(d.get("meta", {})),
        )


def _path(directory: Path, version: int) -> Path:
    return directory / f"site-calibration-v{version}.yaml"


def versions(directory: Path) -> list[int]:
    if not directory.exists():
        return []
    out = []
    for p in directory.glob("site-calibration-v*.yaml"):
        tail = p.stem.rsplit("-v", 1)[-1]
        if tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def active_version(directory: Path) -> int | None:
    f = directory / ACTIVE_FILE
    if not f.exists():
        return None
    text = f.read_text().strip()
    return int(text) if text.isdigit() else None


def activate(directory: Path, version: int | None) -> None:
    if version is not None and version not in versions(directory):
        raise ValueError(f"no site calibration version {version} in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{ACTIVE_FILE}.tmp"
    tmp.write_text(f"{version if version is not None else 'none'}\n")
    tmp.replace(directory / ACTIVE_FILE)


def save_new_version(directory: Path, cal: SiteCalibration, make_active: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cal.version = (versions(directory) or [0])[-1] + 1
    cal.meta["previous_active"] = active_version(directory)
    path = _path(directory, cal.version)
    header = "# Written by `pneumotriage triage recalibrate` from this site's confirmed labels; do not hand-edit.\n"
    path.write_text(header + yaml.safe_dump(cal.to_dict(), sort_keys=False))
    if make_active:
        activate(directory, cal.version)
    return path


def load_version(directory: Path, version: int) -> SiteCalibration:
    return SiteCalibration.from_dict(yaml.safe_load(_path(directory, version).read_text()))


def load_active(directory: Path) -> SiteCalibration | None:
    version = active_version(directory)
    return None if version is None else load_version(directory, version)


def rollback(directory: Path) -> int | None:
    """Activate the version that was active before the current one (None: the model's own calibration)."""
    current = active_version(directory)
    if current is None:
        raise ValueError("no site calibration is active: nothing to roll back")
    previous = load_version(directory, current).meta.get("previous_active")
    activate(directory, previous if isinstance(previous, int) else None)
    return previous if isinstance(previous, int) else None
