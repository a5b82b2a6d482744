"""Every committed model version ships a drift reference, and it is that version's: the logits of a
sample of its validation images are distributed like the reference says (KS), and the aggregator's
drift statistics call the sample stable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.aggregator.drift import DriftConfig, evaluate_window
from services.core.drift import REFERENCE_FILE, DriftReference, ks
from services.inference.config import DEFAULT_MODEL_REPOSITORY
from services.inference.tools.evaluation import predict, select_records
from tests.support.committed_model import committed_versions

MODEL_DIR = DEFAULT_MODEL_REPOSITORY / "pneumonia"


def versions() -> list[Path]:
    """The committed versions' directories, in version order (numeric: 10 comes after 9)."""
    return [MODEL_DIR / str(v) for v in committed_versions()]


def test_every_committed_version_has_its_reference() -> None:
    assert versions()
    for vdir in versions():
        path = vdir / REFERENCE_FILE
        assert path.exists(), f"run `pneumotriage model drift-reference --version {vdir.name}`"
        ref = DriftReference.load(path)
        assert (ref.model_name, ref.model_version) == ("pneumonia", vdir.name)
        assert ref.n >= 200 and np.all(np.diff(ref.quantiles) >= 0) and 0 < ref.positive_rate < 1


def test_reference_matches_its_model(shared_data: Path) -> None:
    vdir = versions()[-1]
    ref = DriftReference.load(vdir / REFERENCE_FILE)
    records = select_records(shared_data / "kermany224" / "train", "val", None)[::8]
    logits, probs, _ = predict(vdir, [r.path for r in records])
    d, p = ks(ref, logits)
    assert p > 0.01, (d, p)
    status = evaluate_window(ref, logits, probs, DriftConfig(MODEL_DIR.parent, min_n=50))
    assert status.status == "ok", status.message
