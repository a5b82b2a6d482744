"""Drift monitor: is the stream of predictions still like the data the model was validated on?

Every ``PT_AGGREGATOR_DRIFT_INTERVAL_S`` the aggregator reads the newest
``PT_AGGREGATOR_DRIFT_WINDOW`` predictions of the active model version (the one that made the newest
prediction: after a deploy or a roll back that is the version being served, even while most of
the window is still the withdrawn one's; from its own database, so it survives restarts and sees
what every replica stored), leaves out the images the input gate refused, and compares them with
the version's validation reference (``drift_reference.json``, see services/core/drift.py):

* PSI, the population stability index of the raw logits (10 equal-frequency bins of the reference);
* KS, the Kolmogorov-Smirnov distance and p-value;
* the predicted-positive rate (P >= 0.5) against the reference's, as a z-score;
* the share of images the gate refused or marked borderline in the window.

The alarm fires when the window has at least ``PT_AGGREGATOR_DRIFT_MIN_N`` predictions and
PSI >= ``PT_AGGREGATOR_DRIFT_PSI_ALARM`` (0.25, the usual "significant shift") or the positive
rate is more than ``PT_AGGREGATOR_DRIFT_RATE_Z`` standard errors from the reference. The figures go
to Prometheus (``pt_aggregator_drift_*{model_version}``: only the judged version's series exists),
the alarm to the worklist banner and the API.
A prevalence change moves the positive rate without any image change: the banner says "the
stream differs", it does not say why (docs/triage-policy.md#drift-monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.aggregator.models import PredictionRow
from services.core.drift import POSITIVE_P, REFERENCE_FILE, DriftReference, ks, psi

log = logging.getLogger(__name__)

_V = ["model_version"]  # the version the monitor judges (the active one)
PSI = Gauge("pt_aggregator_drift_psi", "Population stability index of recent logits vs the validation reference", _V)
KS = Gauge("pt_aggregator_drift_ks", "Kolmogorov-Smirnov distance of recent logits vs the validation reference", _V)
POSITIVE_RATE = Gauge("pt_aggregator_predicted_positive_rate", "Share of recent predictions with P >= 0.5", _V)
REFERENCE_RATE = Gauge(
    "pt_aggregator_reference_positive_rate", "Predicted-positive rate on the validation reference", _V
)
GATE_REFUSED = Gauge("pt_aggregator_gate_refused_share", "Share of recent predictions the input gate refused", _V)
WINDOW = Gauge("pt_aggregator_drift_window", "Predictions in the drift window (gate-refused left out)", _V)
ALARM = Gauge("pt_aggregator_drift_alarm", "1 while the score distribution has drifted from the reference", _V)
GAUGES = (PSI, KS, POSITIVE_RATE, REFERENCE_RATE, GATE_REFUSED, WINDOW, ALARM)


@dataclass
class DriftStatus:
    status: str = "no data"  # "no data" | "no reference" | "collecting" | "ok" | "drift"
    model_name: str = ""
    model_version: str = ""
    n: int = 0
    psi: float | None = None
    ks: float | None = None
    ks_p: float | None = None
    positive_rate: float | None = None
    reference_positive_rate: float | None = None
    rate_z: float | None = None
    gate_refused_share: float | None = None
    gate_borderline_share: float | None = None
    message: str = ""

    @property
    def alarm(self) -> bool:
        return self.status == "drift"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alarm": self.alarm}


@dataclass(frozen=True)
class DriftConfig:
    reference_dir: Path
    window: int = 300
    min_n: int = 100
    psi_alarm: float = 0.25
    rate_z: float = 4.0


def evaluate_window(
    reference: DriftReference | None,
    logits: np.ndarray,
    probabilities: np.ndarray,
    config: DriftConfig,
    gate_refused: int = 0,
    gate_borderline: int = 0,
) -> DriftStatus:
    """The drift status of one window of (gate-accepted) predictions."""
    n = int(logits.size)
    total = n + gate_refused
    out = DriftStatus(n=n)
    if total:
        out.gate_refused_share = gate_refused / total
        out.gate_borderline_share = gate_borderline / total
    if reference is None:
        out.status, out.message = "no reference", "no drift reference for this model version"
        return out
    out.model_name, out.model_version = reference.model_name, reference.model_version
    out.reference_positive_rate = reference.positive_rate
    if n == 0:
        out.status, out.message = "no data", "no predictions yet"
        return out
    out.psi = psi(reference, logits)
    out.ks, out.ks_p = ks(reference, logits)
    rate = float((probabilities >= POSITIVE_P).mean())
    out.positive_rate = rate
    r0 = min(max(reference.positive_rate, 1e-3), 1 - 1e-3)
    out.rate_z = (rate - r0) / math.sqrt(r0 * (1 - r0) / n)
    if n < config.min_n:
        out.status, out.message = "collecting", f"{n} of {config.min_n} predictions needed"
        return out
    reasons = []
    if out.psi >= config.psi_alarm:
        reasons.append(f"score distribution shifted (PSI {out.psi:.2f} >= {config.psi_alarm:.2f})")
    if abs(out.rate_z) >= config.rate_z:
        reasons.append(f"predicted-positive rate {rate:.0%} vs {reference.positive_rate:.0%} on validation")
    out.status = "drift" if reasons else "ok"
    out.message = "; ".join(reasons) or f"PSI {out.psi:.2f}, positive rate {rate:.0%}"
    return out


class DriftMonitor:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], config: DriftConfig) -> None:
        self.sessions = sessions
        self.config = config
        self.status = DriftStatus()
        self._references: dict[tuple[str, str], DriftReference | None] = {}
        self._exported_version: str | None = None

    def reference(self, model_name: str, model_version: str) -> DriftReference | None:
        key = (model_name, model_version)
        if key not in self._references:
            path = self.config.reference_dir / model_name / model_version / REFERENCE_FILE
            try:
                self._references[key] = DriftReference.load(path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("no drift reference", extra={"path": str(path), "error": repr(exc)[:200]})
                self._references[key] = None
        return self._references[key]

    async def check(self) -> DriftStatus:
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(
                        PredictionRow.model_name,
                        PredictionRow.model_version,
                        PredictionRow.logit,
                        PredictionRow.probability,
                        PredictionRow.gate_verdict,
                    )
                    .order_by(PredictionRow.id.desc())
                    .limit(self.config.window)
                )
            ).all()
        if not rows:
            self.status = DriftStatus()
        else:
            name, version = rows[0][0], rows[0][1]  # the newest prediction's version: the active one
            mine = [r for r in rows if (r[0], r[1]) == (name, version)]
            accepted = [r for r in mine if r[4] != "refuse"]
            self.status = evaluate_window(
                self.reference(name, version),
                np.array([r[2] for r in accepted], dtype=np.float64),
                np.array([r[3] for r in accepted], dtype=np.float64),
                self.config,
                gate_refused=len(mine) - len(accepted),
                gate_borderline=sum(1 for r in accepted if r[4] == "borderline"),
            )
            self.status.model_name, self.status.model_version = name, version
        self.export()
        return self.status

    def export(self) -> None:
        s = self.status
        nan = float("nan")
        version = s.model_version or "none"
        if self._exported_version not in (None, version):  # a withdrawn version's series go away
            for gauge in GAUGES:
                with contextlib.suppress(KeyError):
                    gauge.remove(self._exported_version)
        self._exported_version = version
        PSI.labels(version).set(s.psi if s.psi is not None else nan)
        KS.labels(version).set(s.ks if s.ks is not None else nan)
        POSITIVE_RATE.labels(version).set(s.positive_rate if s.positive_rate is not None else nan)
        REFERENCE_RATE.labels(version).set(s.reference_positive_rate if s.reference_positive_rate is not None else nan)
        GATE_REFUSED.labels(version).set(s.gate_refused_share if s.gate_refused_share is not None else nan)
        WINDOW.labels(version).set(s.n)
        ALARM.labels(version).set(1 if s.alarm else 0)

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        was_alarm = False
        while not stop.is_set():
            try:
                status = await self.check()
                if status.alarm != was_alarm:
                    # one key: the status has a "message", which logging's extra= may not overwrite
                    (log.warning if status.alarm else log.info)(
                        "drift alarm" if status.alarm else "drift alarm cleared", extra={"drift": status.to_dict()}
                    )
                    was_alarm = status.alarm
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("drift check failed", extra={"error": repr(exc)[:300]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
