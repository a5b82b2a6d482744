"""Shadow mode (PT_INFERENCE_SHADOW_VERSIONS): candidate versions scored beside the active one on every
live image, stored for `pneumotriage model compare`, and never published.

Safety by construction: a shadow prediction is written only to a local SQLite file
(<PT_DATA_DIR>/shadow/predictions.sqlite); it is never a `Prediction` message, never sent to the
broker, so it cannot reach the aggregator's flag, worklist, SR, FHIR or the drift alarm of the active
version. The active prediction is built (and published by the worker) exactly as without shadows:
shadow scoring starts after it, on its own onnxruntime thread(s), bounded (`max_pending`; more is
dropped and counted), and any shadow failure is logged and counted, never raised into the clinical
path.

Shadow versions always run embedded (onnxruntime on the version's model.onnx in the model
repository), also when the active version is served by Triton: the repository the inference service
reads calibration from holds each version's model.onnx.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter

from services.inference.runtime import ModelRepository, OnnxRuntime

log = logging.getLogger(__name__)

SHADOW_PREDICTIONS = Counter("pt_inference_shadow_predictions_total", "Shadow predictions stored", ["version"])
SHADOW_ERRORS = Counter("pt_inference_shadow_errors_total", "Shadow scoring failures and drops", ["kind"])

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_predictions (
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    model_version TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    logit REAL NOT NULL,
    probability REAL NOT NULL,
    active_version TEXT NOT NULL,
    active_logit REAL NOT NULL,
    active_probability REAL NOT NULL,
    gate_verdict TEXT NOT NULL,
    predicted_at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, sha256, model_version)
)
"""
COLUMNS = (
    "sop_instance_uid",
    "sha256",
    "model_version",
    "study_instance_uid",
    "logit",
    "probability",
    "active_version",
    "active_logit",
    "active_probability",
    "gate_verdict",
    "predicted_at",
)


def parse_versions(text: str) -> list[str]:
    """ "3, 4" -> ["3", "4"] (integers, in order, without repeats)."""
    out: list[str] = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"PT_INFERENCE_SHADOW_VERSIONS: {part!r} is not a version number")
        if str(int(part)) not in out:
            out.append(str(int(part)))
    return out


def store_path(data_dir: Path) -> Path:
    return Path(data_dir) / "shadow" / "predictions.sqlite"


class ShadowStore:
    """The shadow predictions, one row per (image, sha256, shadow version); several processes may write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        marks = ", ".join("?" * len(COLUMNS))
        sql = f"INSERT OR REPLACE INTO shadow_predictions ({', '.join(COLUMNS)}) VALUES ({marks})"
        with self._lock, contextlib.closing(self._connect()) as db, db:
            db.executemany(sql, [tuple(r[c] for c in COLUMNS) for r in rows])

    def rows(self, version: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with contextlib.closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            if version is None:
                cur = db.execute("SELECT * FROM shadow_predictions ORDER BY predicted_at")
            else:
                cur = db.execute(
                    "SELECT * FROM shadow_predictions WHERE model_version = ? ORDER BY predicted_at", (str(version),)
                )
            return [dict(r) for r in cur.fetchall()]


def _resize(tensor: np.ndarray, size: int) -> np.ndarray:
    """[1, S, S] -> [1, size, size] (bilinear): a shadow version with another input size."""
    from PIL import Image

    img = Image.fromarray(np.asarray(tensor[0], dtype=np.float32), mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)[None]


class ShadowScorer:
    """Scores each live image with every shadow version after the active prediction; stores, never publishes."""

    def __init__(
        self,
        repository_root: Path,
        model_name: str,
        versions: list[str],
        store: ShadowStore,
        *,
        threads: int = 1,
        max_pending: int = 64,
    ) -> None:
        self.versions = list(versions)
        self.store = store
        self.max_pending = max_pending
        self.runtimes = {
            v: OnnxRuntime(ModelRepository(repository_root, model_name), version=v, threads=threads)
            for v in self.versions
        }
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for runtime in self.runtimes.values():
            await runtime.start()
        log.info("shadow versions loaded", extra={"shadow_versions": ",".join(self.versions)})

    def submit(self, prediction: Any, tensor: np.ndarray) -> None:
        """Schedule the shadow scoring of one image (returns at once; never raises)."""
        try:
            if len(self._pending) >= self.max_pending:
                SHADOW_ERRORS.labels("dropped_backlog").inc()
                return
            task = asyncio.get_running_loop().create_task(self._score(prediction, tensor))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        except Exception as exc:  # pragma: no cover - defensive: the clinical path goes on
            SHADOW_ERRORS.labels("submit").inc()
            log.error("shadow scoring not scheduled", extra={"error": repr(exc)})

    async def _score(self, prediction: Any, tensor: np.ndarray) -> None:
        rows = []
        for version, runtime in self.runtimes.items():
            if version == prediction.model_version:
                continue  # the active version itself: nothing to shadow
            try:
                size = runtime.input_size
                x = tensor if tensor.shape[-1] == size else _resize(tensor, size)
                out = await runtime.infer(np.ascontiguousarray(x[None], dtype=np.float32))
                logit = float(out.logits[0])
                probability = float(runtime.model(version).calibration.apply(logit))
            except Exception as exc:
                SHADOW_ERRORS.labels("infer").inc()
                log.error("shadow inference failed", extra={"shadow_version": version, "error": repr(exc)[:300]})
                continue
            image = prediction.image
            rows.append(
                {
                    "sop_instance_uid": image.sop_instance_uid,
                    "sha256": image.sha256,
                    "model_version": version,
                    "study_instance_uid": image.study_instance_uid,
                    "logit": logit,
                    "probability": probability,
                    "active_version": prediction.model_version,
                    "active_logit": float(prediction.logit),
                    "active_probability": float(prediction.probability),
                    "gate_verdict": prediction.gate_verdict or "",
                    "predicted_at": time.time(),
                }
            )
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.store.add, rows)
        except Exception as exc:
            SHADOW_ERRORS.labels("store").inc()
            log.error("shadow predictions not stored", extra={"error": repr(exc)[:300]})
            return
        for row in rows:
            SHADOW_PREDICTIONS.labels(row["model_version"]).inc()

    async def drain(self, timeout: float = 10.0) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    async def close(self) -> None:
        await self.drain()
        for task in list(self._pending):
            task.cancel()
        for runtime in self.runtimes.values():
            await runtime.close()
