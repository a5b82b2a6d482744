"""Triage policy: from fused evidence to one flag per image and per study.

Flags, most urgent first (the worklist's sort order; names, order and everything else a flag is
live in the registry, `flags.py`):

* URGENT               fused P(pneumonia) >= urgent threshold (chosen for PPV >= 0.9): read first.
* PNEUMONIA_SUSPECTED  fused P >= suspected threshold.
* UNCERTAIN            in between, or below the rule-out threshold while the model and the humans
                       disagree (one of them alone says pneumonia), or no model score yet: a
                       radiologist should look early.
* NOT_TRIAGED          failed acceptance (wrong view, not a chest X-ray, ...) or refused by the
                       inference input gate (not a frontal chest radiograph, too small): the
                       reason is shown. A gate "borderline" verdict makes the image UNCERTAIN.
* LIKELY_HEALTHY       fused P <= rule-out threshold (chosen for sensitivity >= 0.95), with a model
                       score, and neither the model nor the crowd alone leaning pneumonia. Still read
                       routinely — cleared fast, never discarded.

The policy is monotone: more pneumonia evidence (a higher model score, one more pneumonia vote, a
healthy vote turned into a pneumonia vote) never lowers an image's urgency (tests/unit prove it
with hypothesis). A study takes the most urgent flag of its triaged images; it is LIKELY_HEALTHY
only when every triaged image is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.aggregator.flags import HEALTHY, NOT_TRIAGED, PENDING, SUSPECTED, UNCERTAIN, URGENCY, URGENT
from services.aggregator.fusion import Evidence, FusionWeights


@dataclass
class Thresholds:
    urgent: float = 0.95
    suspected: float = 0.7
    rule_out: float = 0.1
    # LIKELY_HEALTHY is withheld when the model alone says P >= conflict_model_p, or when the
    # trust-weighted human log-odds are > conflict_human_logodds (the crowd leans pneumonia).
    conflict_model_p: float = 0.5
    conflict_human_logodds: float = 0.0


@dataclass
class Policy:
    fusion: FusionWeights = field(default_factory=FusionWeights)
    thresholds: Thresholds = field(default_factory=Thresholds)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- image level -------------------------------------------------------------------------
    def classify(self, evidence: Evidence) -> tuple[str, float | None, str]:
        """(flag, fused P(pneumonia) or None, reason) for one triage-eligible image."""
        if evidence.gate == "refuse":  # the input gate: the model may not judge this image
            return NOT_TRIAGED, None, f"input gate: {evidence.gate_reason or 'not an image the model may judge'}"
        if not evidence.has_model and evidence.human_votes == 0 and evidence.aggregate_p is None:
            return PENDING, None, "waiting for the model and the crowd"
        p = self.fusion.posterior(evidence)
        t = self.thresholds
        src = self._sources(evidence)
        if evidence.gate == "borderline":  # no automatic flag: a radiologist looks first
            why = evidence.gate_reason or "the image may not be one the model may judge"
            return UNCERTAIN, p, f"input gate: {why}; P(pneumonia) {p:.2f} not used for a flag ({src})"
        if p >= t.urgent:
            return URGENT, p, f"P(pneumonia) {p:.2f} >= urgent threshold {t.urgent:.2f} ({src})"
        if p >= t.suspected:
            return SUSPECTED, p, f"P(pneumonia) {p:.2f} >= suspected threshold {t.suspected:.2f} ({src})"
        if p <= t.rule_out:
            blockers = self.rule_out_blockers(evidence)
            if not blockers:
                return HEALTHY, p, f"P(pneumonia) {p:.2f} <= rule-out threshold {t.rule_out:.2f} ({src})"
            return UNCERTAIN, p, f"P(pneumonia) {p:.2f} is low but {'; '.join(blockers)} ({src})"
        band = f"between {t.rule_out:.2f} and {t.suspected:.2f}"
        return UNCERTAIN, p, f"P(pneumonia) {p:.2f} {band}: low confidence ({src})"

    def rule_out_blockers(self, evidence: Evidence) -> list[str]:
        t = self.thresholds
        out: list[str] = []
        if not evidence.has_model:
            out.append("no model score yet")
        elif (evidence.model_probability or 0.0) >= t.conflict_model_p:
            out.append("the model disagrees with the crowd")
        if evidence.human_logodds > t.conflict_human_logodds:
            out.append("the crowd leans pneumonia")
        return out

    @staticmethod
    def _sources(evidence: Evidence) -> str:
        parts = []
        if evidence.model_probability is not None:
            parts.append(f"model {evidence.model_probability:.2f}")
        if evidence.votes:
            pn = sum(1 for v in evidence.votes if v.answer == "pneumonia")
            he = sum(1 for v in evidence.votes if v.answer == "healthy")
            parts.append(f"crowd {pn} pneumonia / {he} healthy")
        elif evidence.aggregate_p is not None:
            parts.append(f"crowd aggregate {evidence.aggregate_p:.2f}")
        return ", ".join(parts) or "no evidence"

    # ---- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "fusion": self.fusion.to_dict(),
            "thresholds": {k: float(v) for k, v in vars(self.thresholds).items()},
            **({"meta": self.meta} if self.meta else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        thresholds = Thresholds(**{k: float(v) for k, v in dict(d.get("thresholds", {})).items()})
        return cls(FusionWeights.from_dict(dict(d.get("fusion", {}))), thresholds, dict(d.get("meta", {})))

    @classmethod
    def load(cls, path: Path) -> Policy:
        if not path.exists():
            return cls()
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})

    def save(self, path: Path, header: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        path.write_text((header + "\n" if header else "") + text)


@dataclass(frozen=True)
class ImageResult:
    flag: str
    p: float | None
    reason: str


def study_result(images: Sequence[ImageResult]) -> tuple[str, float | None, str]:
    """One study's flag from its images' results (NOT_TRIAGED images only count when all are)."""
    if not images:
        return PENDING, None, "no images yet"
    triaged = [r for r in images if r.flag != NOT_TRIAGED]
    if not triaged:
        return NOT_TRIAGED, None, "; ".join(sorted({r.reason for r in images}))
    scored = [r.p for r in triaged if r.p is not None]
    p = max(scored) if scored else None
    flagged = [r for r in triaged if r.flag != PENDING]
    if not flagged:
        return PENDING, p, "waiting for evidence"
    top = min(flagged, key=lambda r: URGENCY[r.flag])
    waiting = len(triaged) - len(flagged)
    if top.flag == HEALTHY and waiting:
        return UNCERTAIN, p, f"{len(flagged)} image(s) look healthy, waiting for evidence on {waiting} more"
    reason = top.reason if len(triaged) == 1 else f"{top.reason} [most urgent of {len(triaged)} images]"
    return top.flag, p, reason
