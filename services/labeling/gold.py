"""Gold items from images with known labels (the Kermany NORMAL / PNEUMONIA folders).

The labels are the public data set's labels, not radiologist-reviewed reads of each image; the
reasons are one sentence per class and pattern (bacterial / viral), written for this job.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import yaml
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.labeling.job import JobDefinition
from services.labeling.models import Task

DEFAULT_REASONS = {
    "normal": "Healthy: both lung fields are dark and clear with fine web-like vessels, and the heart border "
    "and both domes of the diaphragm are sharp.",
    "bacteria": "Pneumonia: a concentrated white opacity fills part of one lung and blurs the nearby heart border "
    "or diaphragm (typical of bacterial pneumonia).",
    "virus": "Pneumonia: a diffuse, hazy, streaky opacity spreads through both lungs from the centre, so the "
    "fields are no longer clear (typical of viral pneumonia).",
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")


def patient_of(name: str) -> str:
    m = re.match(r"person(\d+)_", name) or re.match(r"((?:NORMAL2-)?IM-\d+)-", name)
    return m.group(1) if m else name


def pattern_of(label: str, name: str) -> str:
    if label == "healthy":
        return "normal"
    return "virus" if "virus" in name.lower() else "bacteria"


def choose_gold(data: Path, n: int, seed: int = 7) -> list[tuple[Path, str]]:
    """n images, half healthy half pneumonia (pneumonia split bacterial/viral), one per patient,
    byte-identical duplicates skipped; deterministic for a seed."""
    rng = random.Random(seed)
    picked: list[tuple[Path, str]] = []
    seen_hashes: set[str] = set()
    for folder, label, count in (("NORMAL", "healthy", n - n // 2), ("PNEUMONIA", "pneumonia", n // 2)):
        files = sorted(p for p in (data / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        rng.shuffle(files)
        if label == "pneumonia":  # alternate bacterial and viral so both patterns are taught
            bac = [f for f in files if "virus" not in f.name]
            vir = [f for f in files if "virus" in f.name]
            files = [f for pair in zip(bac, vir, strict=False) for f in pair]
        patients: set[str] = set()
        got = 0
        for f in files:
            if got >= count:
                break
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            if patient_of(f.name) in patients or digest in seen_hashes:
                continue
            patients.add(patient_of(f.name))
            seen_hashes.add(digest)
            picked.append((f.resolve(), label))
            got += 1
    return picked


def load_reasons(path: Path | None) -> dict[str, str]:
    """Optional YAML: keys 'normal' / 'bacteria' / 'virus' or image file names -> one-sentence reason."""
    reasons = dict(DEFAULT_REASONS)
    if path is not None:
        reasons.update({str(k): str(v) for k, v in (yaml.safe_load(path.read_text()) or {}).items()})
    return reasons


async def import_gold(
    s: AsyncSession, job: JobDefinition, chosen: list[tuple[Path, str]], reasons: dict[str, str]
) -> dict[str, int]:
    """Add gold items (idempotent on file path): examples per class first, then the quiz pool (one
    disjoint set of quiz_length items per allowed attempt), then hidden."""
    existing = {t.source_path: t for t in (await s.scalars(select(Task).where(Task.source_path.is_not(None)))).all()}
    counts = {"example": 0, "quiz": 0, "hidden": 0}
    examples = {"healthy": 0, "pneumonia": 0}
    for t in existing.values():
        counts[t.kind] = counts.get(t.kind, 0) + 1
        if t.kind == "example" and t.gold_label in examples:
            examples[t.gold_label] += 1
    quiz_per_class = {"healthy": 0, "pneumonia": 0}
    for t in existing.values():
        if t.kind == "quiz" and t.gold_label in quiz_per_class:
            quiz_per_class[t.gold_label] += 1
    added = 0
    for path, label in chosen:
        if str(path) in existing:
            continue
        if examples[label] < job.gold.examples_per_class:
            kind = "example"
            examples[label] += 1
        elif quiz_per_class[label] < (job.quiz_pool + (label == "healthy")) // 2:
            kind = "quiz"
            quiz_per_class[label] += 1
        else:
            kind = "hidden"
        reason = reasons.get(path.name) or reasons[pattern_of(label, path.name)]
        s.add(
            Task(
                kind=kind,
                source_path=str(path),
                gold_label=label,
                gold_reason=reason,
                job_key=job.key,
                status="open",
                needed=0,
            )
        )
        counts[kind] += 1
        added += 1
    return {**counts, "added": added}
