"""Building blocks of a whole-system run shared by the end-to-end, fault, soak tests and the
benchmark: images to send, accounts, gold, a simulated crowd through the labeling HTTP API."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from harness.system_dicom import MadeImage, make_study_set
from harness.system_harness import SendResult, SystemHarness

REPO = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO / "deploy" / "triton" / "model_repository"
OWNER = ("sys-owner", "sys-owner-pass-1")
CLINICIAN = ("sys-clinician", "sys-clinician-pass-1")

# Settings that make a test run quick without changing what is tested.
FAST_ENV: dict[str, str] = {
    # an answer becomes final (published to the aggregator) 2 s after it is given, not 30 s
    "PT_LABELING_UNDO_WINDOW_S": "2",
}


def model_env() -> dict[str, str]:
    """The committed model (deploy/triton/model_repository); PT_SYSTEM_TEST_MODEL_REPOSITORY overrides."""
    override = os.environ.get("PT_SYSTEM_TEST_MODEL_REPOSITORY")
    if override:
        return {"PT_INFERENCE_MODEL_REPOSITORY": override}
    assert list(MODEL_REPOSITORY.glob("pneumonia/*/model.onnx")), (
        "no committed model under deploy/triton/model_repository/pneumonia (it is part of the repository)"
    )
    return {}


@dataclass
class Batch:
    images: list[MadeImage]

    @property
    def paths(self) -> list[Path]:
        return [m.path for m in self.images]

    def uids(self, paths: list[Path]) -> set[str]:
        by_path = {m.path: m.sop_instance_uid for m in self.images}
        return {by_path[p] for p in paths}

    def acked_uids(self, sent: SendResult) -> set[str]:
        return self.uids(sent.acked)

    @property
    def studies(self) -> set[str]:
        return {m.study_instance_uid for m in self.images}


def make_batch(shared_data: Path, out_dir: Path, n: int, seed: int = 7) -> Batch:
    return Batch(make_study_set(shared_data, out_dir, n, seed))


def link_truth(images: list[tuple[Path, str]], root: Path) -> Path:
    """A NORMAL/ + PNEUMONIA/ folder of symlinks to known-label JPEGs (never copies of the data)."""
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for i, (src, label) in enumerate(images):
        link = root / label / f"{i:05d}-{src.name}"
        if not link.exists():
            link.symlink_to(src.resolve())
    return root


def gold_folder(shared_data: Path, root: Path, exclude: set[Path], n: int = 28, seed: int = 11) -> Path:
    train = shared_data / "kermany224" / "train"
    rng = random.Random(seed)
    picks: list[tuple[Path, str]] = []
    for label in ("NORMAL", "PNEUMONIA"):
        pool = [p for p in sorted((train / label).glob("*.jpeg")) if p not in exclude]
        picks += [(p, label) for p in rng.sample(pool, n // 2)]
    return link_truth(picks, root)


def seed_accounts_and_gold(system: SystemHarness, gold_dir: Path, n_gold: int = 28) -> None:
    system.cli("labeling", "add-user", OWNER[0], "--role", "owner", "--password", OWNER[1])
    system.cli("aggregator", "add-user", CLINICIAN[0], "--role", "clinician", "--password", CLINICIAN[1])
    system.cli("labeling", "import-gold", "--data", str(gold_dir), "--n", str(n_gold))


def run_crowd(
    system: SystemHarness, truth: list[Path], annotators: str = "expert:4,careless:1", max_judgments: int = 400
) -> str:
    args = ["labeling", "simulate-crowd", "--url", system.url("labeling"), "--annotators", annotators]
    for t in truth:
        args += ["--truth", str(t)]
    args += ["--owner", OWNER[0], "--owner-password", OWNER[1], "--max-judgments", str(max_judgments)]
    return system.cli(*args, timeout=600).stdout
