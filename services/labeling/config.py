"""Labeling service settings (env prefix PT_, fields prefixed labeling_ -> PT_LABELING_...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from services.core.auth import AuthSettings
from services.core.gate import DEFAULT_GATE_FILE

DEFAULT_JOB_FILE = Path(__file__).resolve().parent / "jobs" / "pneumonia-v1.yaml"


class LabelingSettings(AuthSettings):
    # Web app (annotators, job owner, JSON API), /healthz and /metrics.
    labeling_http_port: int = 8003
    # The versioned job definition (question, options, redundancy, gold ratio, quiz, trust, pay).
    labeling_job_file: Path = DEFAULT_JOB_FILE
    # Rendered PNGs are cached here; default <data_dir>/labeling-render.
    labeling_render_dir: Path | None = None
    # Longest side of the PNG sent to browsers (pixels).
    labeling_render_max_side: int = 1024
    # An answer can be undone until the annotator answers the next image or this many seconds pass;
    # then it is final: published (judgment.submitted) and aggregated.
    labeling_undo_window_s: float = 30.0
    # How long a task handed to an annotator stays reserved for them.
    labeling_lease_s: float = 600.0
    # CPU priority of the labeling process (nice 0-19). Crowd tasks can wait minutes; a triage flag
    # should not wait for annotator PNGs, so on a shared machine labeling yields the CPU to the
    # triage path (services/core/priority.py). 0 = the same priority as the other services.
    labeling_cpu_nice: int = 10
    # The input gate (services/core/gate.py, the same rules as inference's): an image it refuses becomes
    # no crowd task (counted and listed on the owner page); a borderline one is marked in the export.
    # Off only for experiments. Use the same gate file as PT_INFERENCE_GATE_FILE.
    labeling_gate: bool = True
    labeling_gate_file: Path = DEFAULT_GATE_FILE
    # Backfill images (a catch-up, a migration, old studies; services/core/lanes.py) for the crowd:
    # none (default: the crowd labels today's patients), sample (a deterministic share of
    # labeling_backfill_sample, by SOP instance UID) or all.
    labeling_backfill_crowd: Literal["none", "sample", "all"] = "none"
    labeling_backfill_sample: float = 0.05

    def resolved_gate_file(self) -> str | None:
        return str(self.labeling_gate_file) if self.labeling_gate else None

    def render_dir(self) -> Path:
        return self.labeling_render_dir or self.data_dir / "labeling-render"
