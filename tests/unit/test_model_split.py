"""Patient ids from file names, de-duplication and the committed patient-level split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from services.inference.tools.training.dataset import patient_id, scan_folder
from services.inference.tools.training.split import SPLIT_FILE, assign, load_split, make_split


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1134_virus_1945.jpeg", "person1134"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "NORMAL2-IM-0587"),
        ("some_other_image.png", "some_other_image"),
    ],
)
def test_patient_id_from_file_name(name: str, patient: str) -> None:
    assert patient_id(name) == patient


@pytest.fixture(scope="module")
def records(shared_data: Path):
    return scan_folder(shared_data / "kermany224" / "train")


def test_committed_split_is_reproduced_by_the_split_function(records) -> None:
    committed = load_split(SPLIT_FILE)
    fresh = make_split(records, seed=committed["seed"], fractions=tuple(committed["fractions"]))
    assert fresh == committed


def test_split_is_by_patient_stratified_and_deduplicated(records) -> None:
    split = load_split(SPLIT_FILE)
    parts = assign(records, split)
    patients = {name: {r.patient for r in recs} for name, recs in parts.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    hashes = [r.sha256 for recs in parts.values() for r in recs]
    assert len(hashes) == len(set(hashes)), "byte-identical images survived de-duplication"
    assert sum(len(v) for v in parts.values()) + len(split["dropped_duplicates"]) == len(records)
    prevalence = {k: sum(r.label for r in v) / len(v) for k, v in parts.items()}
    assert max(prevalence.values()) - min(prevalence.values()) < 0.05
    share = Counter({k: len(v) / len(records) for k, v in parts.items()})
    assert 0.6 < share["train"] < 0.8 and 0.1 < share["val"] < 0.2 and 0.1 < share["test"] < 0.2


def test_a_different_seed_gives_a_different_split(records) -> None:
    a = make_split(records, seed=1)
    b = make_split(records, seed=2)
    assert a["test_patients"] != b["test_patients"]
    assert a["dropped_duplicates"] == b["dropped_duplicates"]
