"""The export says where each posterior comes from."""

from __future__ import annotations

from services.labeling.export import DATASET_COLUMNS, posterior_source


def test_posterior_source() -> None:
    assert "posterior_source" in DATASET_COLUMNS and "p_pneumonia" in DATASET_COLUMNS
    assert posterior_source("dawid_skene") == "crowd"
    assert posterior_source("majority") == "crowd"
    assert posterior_source("dawid_skene+model") == "crowd + model prior"
    assert posterior_source("clinician") == "clinician"
    assert posterior_source(None) is None
