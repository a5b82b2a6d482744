"""A simulated crowd that signs in and answers through the HTTP API, like real annotators.

Each simulated annotator answers with the difficulty-aware model of `crowd_model` (skill x image
difficulty, shared confusions on hard images, pneumonia bias, fatigue, answer times). It knows the
truth only by *looking at the image*: the PNG it is served is matched (normalised 16x16 thumbnail,
nearest neighbour) against a folder of images with known labels (NORMAL/ and PNEUMONIA/ subfolders);
the image's difficulty (weak-classifier margin) comes from an optional CSV keyed by file name
(bench/data/labeling-difficulty.csv), else the median difficulty. Profiles: expert, good, typical,
biased, careless, adversarial (answers the quiz well, then flips), spammer (answers the quiz well,
then always says pneumonia).
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from services.labeling.render import render_source
from services.labeling.tools.crowd_model import PROFILES, SimAnnotator, parse_spec

__all__ = ["PROFILES", "TruthIndex", "load_margins", "parse_spec", "simulate"]

CLASSES = ("pneumonia", "healthy")
ANSWERS = ("pneumonia", "healthy", "cant_tell")


def load_margins(path: Path | None) -> dict[str, float]:
    """file name -> weak-classifier margin, from a CSV with columns file, weak_margin."""
    if path is None:
        return {}
    with open(path, newline="") as fh:
        return {row["file"]: float(row["weak_margin"]) for row in csv.DictReader(fh)}


def fingerprint(arr: np.ndarray) -> np.ndarray:
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).resize((16, 16), Image.Resampling.BILINEAR)
    v = np.asarray(img, dtype=np.float32).ravel()
    return (v - v.mean()) / (v.std() + 1e-6)


class TruthIndex:
    """Known-label images (any mix of JPEG/PNG/DICOM) indexed by a contrast-normalised thumbnail."""

    def __init__(self, roots: list[Path]) -> None:
        prints, labels, names = [], [], []
        for root in roots:
            for folder, label in (("PNEUMONIA", "pneumonia"), ("NORMAL", "healthy")):
                d = root / folder
                if not d.is_dir():
                    continue
                for f in sorted(d.iterdir()):
                    if f.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm"):
                        png = render_source(f, 64)
                        prints.append(fingerprint(np.asarray(Image.open(io.BytesIO(png)), np.float32) / 255.0))
                        labels.append(label)
                        names.append(f.name)
        if not prints:
            raise ValueError(f"no labeled images under {roots}")
        self.prints = np.stack(prints)
        self.labels = labels
        self.names = names

    def lookup(self, png: bytes) -> tuple[str, str]:
        """(true class, file name) of the known image the PNG shows."""
        fp = fingerprint(np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32) / 255.0)
        best = int(np.argmax(self.prints @ fp))
        return self.labels[best], self.names[best]

    def label_of(self, png: bytes) -> str:
        return self.lookup(png)[0]


@dataclass
class AnnotatorRun:
    name: str
    profile: str
    judgments: int = 0
    quiz_passed: bool | None = None
    stopped: bool = False
    seen: dict[str, str] = field(default_factory=dict)  # task_id -> true class


async def run_annotator(
    url: str,
    name: str,
    password: str,
    profile: str,
    truth: TruthIndex,
    rng: random.Random,
    max_judgments: int,
    truth_cache: dict[str, str],
    margins: dict[str, float] | None = None,
    idle_retries: int = 4,
    idle_wait_s: float = 2.0,
) -> AnnotatorRun:
    run = AnnotatorRun(name, profile)
    gen = np.random.default_rng(rng.getrandbits(64))
    annotator = SimAnnotator.draw(name, profile, gen)
    margins = margins or {}
    file_of: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        token = (await client.get("/api/csrf")).json()["csrf_token"]
        res = await client.post(
            "/api/login", json={"name": name, "password": password}, headers={"X-CSRF-Token": token}
        )
        res.raise_for_status()
        headers = {"X-CSRF-Token": res.json()["csrf_token"]}
        (await client.post("/api/instructions", headers=headers)).raise_for_status()
        idle = 0
        while run.judgments < max_judgments:
            nxt = (await client.get("/api/next")).json()
            if nxt["state"] == "done" and idle < idle_retries:  # images reopen when others are stopped
                idle += 1
                await asyncio.sleep(idle_wait_s)
                continue
            if nxt["state"] in ("done", "stopped"):
                run.stopped = nxt["state"] == "stopped"
                break
            idle = 0
            task_id = nxt["task_id"]
            if task_id not in truth_cache or task_id not in file_of:
                png = (await client.get(nxt["image_url"])).content
                truth_cache[task_id], file_of[task_id] = truth.lookup(png)
            true = truth_cache[task_id]
            run.seen[task_id] = true
            answer, confidence, _seconds = annotator.answer(
                true, margins.get(file_of[task_id]), gen, quiz=nxt["state"] == "quiz"
            )
            body: dict[str, Any] = {"task_id": task_id, "answer": answer, "confidence": confidence}
            if answer == "cant_tell":
                body["reason"] = "poor image quality (blurred, too dark or too bright)"
            res = await client.post("/api/judgments", json=body, headers=headers)
            if res.status_code == 409:  # e.g. the image closed meanwhile: just ask for the next one
                continue
            res.raise_for_status()
            out = res.json()
            if out.get("quiz_finished"):
                run.quiz_passed = bool(out.get("quiz_passed"))
            if nxt["state"] == "work":
                run.judgments += 1
            if out.get("stopped"):
                run.stopped = True
                break
    return run


async def simulate(
    url: str,
    profiles: list[str],
    password: str,
    truth: TruthIndex,
    owner: tuple[str, str],
    seed: int = 1,
    max_judgments: int = 400,
    settle_s: float = 60.0,
    name_prefix: str = "sim",
    margins: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run every annotator concurrently, wait until the service has finalised their answers, then
    compare the service's labels (Dawid-Skene) with majority vote against the truth."""
    truth_cache: dict[str, str] = {}
    runs = await asyncio.gather(
        *(
            run_annotator(
                url,
                f"{name_prefix}-{p}-{i}",
                password,
                p,
                truth,
                random.Random(seed * 1000 + i),
                max_judgments,
                truth_cache,
                margins,
            )
            for i, p in enumerate(profiles)
        )
    )
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        token = (await client.get("/api/csrf")).json()["csrf_token"]
        (
            await client.post(
                "/api/login", json={"name": owner[0], "password": owner[1]}, headers={"X-CSRF-Token": token}
            )
        ).raise_for_status()
        deadline = asyncio.get_running_loop().time() + settle_s
        while True:
            labels = (await client.get("/api/owner/labels")).json()
            if labels["pending"] == 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(1.0)
        summary = (await client.get("/api/owner/summary")).json()
    return evaluate(runs, labels, summary, truth_cache)


def evaluate(
    runs: list[AnnotatorRun], labels: dict[str, Any], summary: dict[str, Any], truth: dict[str, str]
) -> dict[str, Any]:
    images = [t for t in labels["tasks"] if t["task_id"] in truth and t["complete"]]
    em_right = mv_right = mv_active_right = 0
    extra_votes_disputed: list[int] = []
    extra_votes_agreed: list[int] = []
    for t in images:
        true = truth[t["task_id"]]
        em_right += t["final_label"] == true
        votes = [j["answer"] for j in t["all_judgments"] if j["answer"] in CLASSES]
        mv = Counter(votes).most_common()
        mv_label = mv[0][0] if mv and (len(mv) == 1 or mv[0][1] > mv[1][1]) else "pneumonia"  # ties -> pneumonia
        mv_right += mv_label == true
        active = [
            j["answer"] for j in t["all_judgments"] if j["answer"] in CLASSES and j["annotator_status"] != "stopped"
        ]
        mva = Counter(active).most_common()
        mva_label = mva[0][0] if mva and (len(mva) == 1 or mva[0][1] > mva[1][1]) else "pneumonia"
        mv_active_right += mva_label == true
        first3 = [j["answer"] for j in t["all_judgments"][:3]]
        (extra_votes_agreed if len(set(first3)) == 1 else extra_votes_disputed).append(len(t["all_judgments"]))
    n = max(len(images), 1)
    by_profile: dict[str, list[dict[str, Any]]] = {}
    table = {a["name"]: a for a in summary["annotators"]}
    for r in runs:
        a = table.get(r.name, {})
        by_profile.setdefault(r.profile, []).append(
            {
                "name": r.name,
                "quiz_passed": r.quiz_passed,
                "status": a.get("status"),
                "trust": a.get("trust"),
                "gold_accuracy": a.get("gold_accuracy"),
                "judgments": a.get("judgments"),
            }
        )
    return {
        "images": len(images),
        "images_open": sum(1 for t in labels["tasks"] if not t["complete"]),
        "accuracy_service_em": em_right / n,
        "accuracy_majority_vote_all": mv_right / n,
        "accuracy_majority_vote_active": mv_active_right / n,
        "mean_judgments_first3_agreed": float(np.mean(extra_votes_agreed)) if extra_votes_agreed else None,
        "mean_judgments_first3_disputed": float(np.mean(extra_votes_disputed)) if extra_votes_disputed else None,
        "cost_so_far": summary["cost_so_far"],
        "cost_per_final_label": summary["cost_per_final_label"],
        "currency": summary["currency"],
        "fleiss_kappa": summary["fleiss_kappa"],
        "krippendorff_alpha": summary["krippendorff_alpha"],
        "annotators": by_profile,
    }
