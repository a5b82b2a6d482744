"""Deterministic, stratified patient-level split (train / val / test), de-duplicated by hash first.

Rule: scan NORMAL/ and PNEUMONIA/, drop byte-identical copies (keep the first in (class, name)
order), group the remaining images by patient (see dataset.patient_id), then per class shuffle the
sorted patient ids with numpy's PCG64 seeded by ``seed`` and cut at the fractions. Every image of a
patient lands in one split. The committed ``split.json`` next to this file records the result (the
held-out patient ids and the dropped duplicates) so tests and ``pneumotriage model evaluate
--split test`` reproduce it without re-running anything.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from services.inference.tools.training.dataset import ImageRecord, dataset_sha256, deduplicate

SPLIT_FILE = Path(__file__).with_name("split.json")
DEFAULT_SEED = 20180222
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
SPLITS = ("train", "val", "test")


def make_split(
    records: list[ImageRecord], seed: int = DEFAULT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict:
    kept, dropped = deduplicate(records)
    patients_by_label: dict[int, set[str]] = defaultdict(set)
    for rec in kept:
        patients_by_label[rec.label].add(rec.patient)
    assignment: dict[str, str] = {}
    rng = np.random.default_rng(seed)
    for label in sorted(patients_by_label):
        ids = sorted(patients_by_label[label])
        order = rng.permutation(len(ids))
        n_val = round(len(ids) * fractions[1])
        n_test = round(len(ids) * fractions[2])
        for rank, idx in enumerate(order):
            assignment[ids[idx]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    counts = {s: {"patients": 0, "images": 0, "NORMAL": 0, "PNEUMONIA": 0} for s in SPLITS}
    for split in assignment.values():
        counts[split]["patients"] += 1
    for rec in kept:
        c = counts[assignment[rec.patient]]
        c["images"] += 1
        c["PNEUMONIA" if rec.label else "NORMAL"] += 1
    return {
        "rule": "dedup by sha256 (keep first by class, name); stratified by class at patient level; "
        "numpy default_rng(seed).permutation of sorted patient ids per class; val first, then test",
        "seed": seed,
        "fractions": list(fractions),
        "data_sha256": dataset_sha256(records),
        "counts": counts,
        "dropped_duplicates": sorted(r.name for r in dropped),
        "val_patients": sorted(p for p, s in assignment.items() if s == "val"),
        "test_patients": sorted(p for p, s in assignment.items() if s == "test"),
    }


def assign(records: list[ImageRecord], split: dict) -> dict[str, list[ImageRecord]]:
    """Records per split name according to a split dict; dropped duplicates are left out."""
    dropped = set(split["dropped_duplicates"])
    val, test = set(split["val_patients"]), set(split["test_patients"])
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for rec in records:
        if rec.name in dropped:
            continue
        out["val" if rec.patient in val else "test" if rec.patient in test else "train"].append(rec)
    return out


def load_split(path: Path = SPLIT_FILE) -> dict:
    return json.loads(Path(path).read_text())


def save_split(split: dict, path: Path = SPLIT_FILE) -> None:
    Path(path).write_text(json.dumps(split, indent=1) + "\n")
