"""Progress bars on the long model commands (issue 27, CLI pass): gate-fit (features, then the group
folds), gate-evaluate, proxy-eval and drift-reference report every step to a Rich progress bar, and
recalibrate ticks once per bootstrap resample. Each bar ends full, and the work is the same with or
without one (the same random draws: identical features). Real images, the committed model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from services.aggregator.tools import recalibrate as rc
from services.core.calibration import sigmoid
from services.core.gate import DEFAULT_GATE_FILE, GateModel
from services.inference.tools.evaluation import predict
from services.inference.tools.gate_fit import build_corpus, evaluate_gate, fit_gate
from services.inference.tools.progress import progress_bar
from services.inference.tools.proxy import proxy_evaluate
from tests.support.aggregator_service import TEST_POLICY
from tests.support.committed_model import committed_version_dir


def quiet_bar() -> Progress:
    return progress_bar(Console(file=io.StringIO(), force_terminal=True, width=120))


def finished(progress: Progress) -> dict[str, tuple[float, float | None]]:
    steps = {t.description: (t.completed, t.total) for t in progress.tasks}
    assert steps, "no progress was reported"
    assert all(total is not None and done == total > 0 for done, total in steps.values()), steps
    return steps


def test_gate_fit_and_gate_evaluate_report_every_step(shared_data: Path) -> None:
    data = shared_data / "kermany224" / "train"
    with quiet_bar() as progress:
        corpus = build_corpus(data, seed=0, limit=8, progress=progress)
        fit_gate(corpus, hidden=0, progress=progress)
    steps = finished(progress)
    assert steps["features: training chests"] == (8, 8)
    assert steps["fit: 5 group folds, then all"] == (6, 6)
    assert {"features: DICOM negatives", "features: synthetic negatives"} <= set(steps)
    assert np.array_equal(build_corpus(data, seed=0, limit=8).x, corpus.x)  # same work without a bar

    with quiet_bar() as progress:
        results = evaluate_gate(GateModel.load(DEFAULT_GATE_FILE), data, limit=8, progress=progress)
    steps = finished(progress)
    assert steps["chest JPEG"] == (8, 8) and "non-chest" in steps
    assert any(name.startswith("chest DICOM ") for name in steps) and results["chest_jpeg"]["n"] == 8


def test_proxy_eval_and_drift_reference_predictions_report_progress(shared_data: Path) -> None:
    version = committed_version_dir()  # the version the committed config.pbtxt serves
    data = shared_data / "kermany224" / "train"
    with quiet_bar() as progress:
        report = proxy_evaluate(version, data, sample=8, stresses=["clean"], progress=progress)
    steps = finished(progress)
    assert any(name.endswith("read images") for name in steps) and any("clean" in name for name in steps)
    assert report is not None

    paths = sorted((data / "NORMAL").glob("*.jpeg"))[:5]
    with quiet_bar() as progress:
        predict(version, paths, progress=progress)  # what drift-reference runs under its bar
    assert finished(progress)["predict"] == (5, 5)


def test_recalibrate_ticks_once_per_bootstrap_resample() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, 200)
    y = (rng.random(200) < sigmoid(logits)).astype(int)
    labels = [
        rc.SiteLabel(str(i), float(z), float(sigmoid(z)), int(v), "clinician", "pneumonia", "1")
        for i, (z, v) in enumerate(zip(logits, y, strict=True))
    ]
    ticks: list[int] = []
    rc.fit_site_calibration(labels, TEST_POLICY, bootstrap=25, on_resample=lambda: ticks.append(1))
    assert len(ticks) == 25
