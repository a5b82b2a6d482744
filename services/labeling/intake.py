"""A work image before it becomes a crowd task: decode it once, ask the input gate whether the image
may be judged at all (the same rules as inference's, services/core/gate.py), and render the PHI-free
PNG only for an image the gate did not refuse. Runs in a worker thread, with no transaction open.

A refused image (a 10 x 10 test pattern, an MR slice tagged DX / CHEST / PA, a field of view no chest
has, ...) must not cost the job anything: no task, no PNG, no judgment, nothing in an export. A
borderline one becomes a task that carries the verdict (marked in the export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.core.gate import BORDERLINE, REFUSE, GateVerdict, assess, gate_image, load_gate
from services.core.imaging import display_array, read_dicom
from services.labeling.render import cached_png, is_dicom_path


@dataclass
class Prepared:
    png: Path | None  # None: refused by the gate, nothing rendered
    gate: GateVerdict | None  # None: the gate is off

    @property
    def refused(self) -> bool:
        return self.gate is not None and self.gate.verdict == REFUSE


def _gate_picture(gray: np.ndarray, gate_file: str) -> GateVerdict:
    """A JPEG/PNG file has no header: only the pixel rules and the learned score apply."""
    try:
        return assess(gray, None, load_gate(gate_file))
    except Exception as exc:  # as inference does: a gate that fails makes the image borderline
        reason = f"input gate could not assess the image ({type(exc).__name__})"
        return GateVerdict(BORDERLINE, reason, version="error", check="error")


def prepare_work_image(cache_dir: Path, task_id: str, source: Path, max_side: int, gate_file: str | None) -> Prepared:
    """Gate, then render the task's PNG (one decode for both). Raises what reading or decoding raises."""
    if is_dicom_path(source):
        ds = read_dicom(source)
        display = display_array(ds)
        verdict = gate_image(ds, gate_file, display) if gate_file else None
        shown = display
    else:
        with Image.open(source) as img:
            shown = np.asarray(img.convert("L"), dtype=np.float32)  # raw grey levels, as render reads them
        verdict = _gate_picture(shown / 255.0, gate_file) if gate_file else None
    if verdict is not None and verdict.verdict == REFUSE:
        return Prepared(None, verdict)
    return Prepared(cached_png(cache_dir, task_id, source, max_side, display=shown), verdict)
