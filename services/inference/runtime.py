"""Model runtimes behind one interface: onnxruntime in-process (the embedded default) or Triton.

Both take a preprocessed batch float32 [N, 1, S, S] and return the raw logits [N], the class
activation maps [N, h, w] and the model version that actually ran (Triton says which one it used).
Calibration lives with each version in the model repository (<model>/<version>/metadata.json);
`ModelRepository` reads it for whichever version answered.

Errors: `RuntimeUnavailable` means "try again later" (Triton down, restarting, model not loaded):
the micro-batcher keeps the batch and retries in-process with back-off, so no message is
dead-lettered merely because Triton was away. Any other exception is a real failure of that batch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.core.calibration import platt, sigmoid
from services.core.calibration import temperature as scaled_by_temperature
from services.inference.repository import list_versions, read_version_policy

log = logging.getLogger(__name__)


class RuntimeUnavailable(Exception):
    """The runtime cannot answer right now (transient): retry later, do not fail the message."""


class ModelNotFound(Exception):
    """No usable model version in the repository (a deployment error, not a message error)."""


@dataclass(frozen=True)
class Calibration:
    """Logit -> calibrated probability, as stored in metadata.json's "calibration"."""

    method: str = "temperature"
    temperature: float = 1.0
    # isotonic: piecewise-linear map from logit knots x to probabilities y (monotone)
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    # platt: sigmoid(a * logit + b)
    a: float = 1.0
    b: float = 0.0

    @classmethod
    def from_metadata(cls, data: dict[str, Any] | None) -> Calibration:
        if not data:
            return cls(method="none")
        method = str(data.get("method", "temperature")).lower()
        if method == "temperature":
            t = float(data["temperature"])
            if not math.isfinite(t) or t <= 0:
                raise ValueError(f"calibration temperature must be > 0, got {t}")
            return cls(method=method, temperature=t)
        if method == "isotonic":
            x = tuple(float(v) for v in data["x"])
            y = tuple(float(v) for v in data["y"])
            if len(x) != len(y) or len(x) < 2 or any(b < a for a, b in itertools.pairwise(x)):
                raise ValueError("isotonic calibration needs increasing knots x and values y of equal length")
            return cls(method=method, x=x, y=y)
        if method == "platt":
            return cls(method=method, a=float(data["a"]), b=float(data["b"]))
        if method == "none":
            return cls(method="none")
        raise ValueError(f"unknown calibration method {method!r}")

    def apply(self, logits: np.ndarray | float) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "temperature":
            return scaled_by_temperature(z, self.temperature)
        if self.method == "platt":
            return platt(z, self.a, self.b)
        if self.method == "isotonic":
            return np.clip(np.interp(z, self.x, self.y), 0.0, 1.0)
        return sigmoid(z)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    input_size: int
    calibration: Calibration
    directory: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class ModelRepository:
    """Read-only view of a Triton model repository: versions, the pinned one, per-version metadata."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = Path(root)
        self.name = name
        self._cache: dict[str, ModelVersion] = {}

    @property
    def model_dir(self) -> Path:
        return self.root / self.name

    def versions(self) -> list[int]:
        if not self.model_dir.is_dir():
            return []
        return list_versions(self.model_dir)

    def pinned_versions(self) -> list[int]:
        """Versions named by config.pbtxt's `version_policy: { specific: ... }` (empty: none pinned)."""
        config = self.model_dir / "config.pbtxt"
        if not config.exists():
            return []
        return read_version_policy(config.read_text())

    def resolve(self, requested: str = "") -> str:
        """The version the embedded runtime serves: requested, else the pinned one, else the newest."""
        available = self.versions()
        if requested:
            if int(requested) not in available:
                raise ModelNotFound(f"model {self.name} version {requested} not in {self.model_dir} ({available})")
            return str(int(requested))
        pinned = [v for v in self.pinned_versions() if v in available]
        if pinned:
            return str(max(pinned))
        if not available:
            raise ModelNotFound(f"no version of model {self.name} with a model.onnx under {self.model_dir}")
        return str(max(available))

    def get(self, version: str) -> ModelVersion:
        cached = self._cache.get(version)
        if cached is not None:
            return cached
        directory = self.model_dir / str(version)
        meta_path = directory / "metadata.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError as exc:
            raise ModelNotFound(f"no metadata.json for {self.name} version {version} in {directory}") from exc
        model = ModelVersion(
            name=str(meta.get("name") or self.name),
            version=str(version),
            input_size=int(meta["input_size"]),
            calibration=Calibration.from_metadata(meta.get("calibration")),
            directory=directory,
            metadata=meta,
        )
        self._cache[version] = model
        return model


@dataclass
class InferOutput:
    logits: np.ndarray  # [N] float32
    cams: np.ndarray  # [N, h, w] float32
    model_version: str


class InferenceRuntime(ABC):
    """What the worker needs from a runtime."""

    kind: str = ""
    # how many batches may be in flight at once (onnxruntime: 1 — it already uses every core)
    max_concurrency: int = 1

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    @property
    @abstractmethod
    def input_size(self) -> int: ...

    @property
    @abstractmethod
    def model_version(self) -> str:
        """The version currently expected to answer ("" when not known yet)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def ready(self) -> bool: ...

    @abstractmethod
    async def infer(self, batch: np.ndarray) -> InferOutput: ...

    async def close(self) -> None:
        return None

    def model(self, version: str) -> ModelVersion:
        return self.repository.get(version)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.repository.name, "version": self.model_version}


class OnnxRuntime(InferenceRuntime):
    """The ONNX graph in-process with onnxruntime (CPU), one batch at a time on its own thread."""

    kind = "onnxruntime"

    def __init__(self, repository: ModelRepository, version: str = "", threads: int = 0, spin: bool = False) -> None:
        super().__init__(repository)
        self.requested_version = version
        self.threads = threads
        self.spin = spin
        self.session: Any = None
        self._version = ""
        self._model: ModelVersion | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")

    @property
    def input_size(self) -> int:
        assert self._model is not None, "start() first"
        return self._model.input_size

    @property
    def model_version(self) -> str:
        return self._version

    def load(self) -> None:
        import onnxruntime as ort

        version = self.repository.resolve(self.requested_version)
        model = self.repository.get(version)
        assert model.directory is not None
        options = ort.SessionOptions()
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # By default no busy-waiting between runs: the decode threads need those cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        self.session = ort.InferenceSession(
            str(model.directory / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._model, self._version = model, version
        log.info("onnxruntime model loaded", extra={"model": model.name, "model_version": version})

    async def start(self) -> None:
        if self.session is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.load)

    async def ready(self) -> bool:
        return self.session is not None

    def run_sync(self, batch: np.ndarray) -> InferOutput:
        logits, cams = self.session.run(["logit", "cam"], {"image": batch})
        return InferOutput(np.asarray(logits, np.float32).reshape(-1), np.asarray(cams, np.float32), self._version)

    async def infer(self, batch: np.ndarray) -> InferOutput:
        if self.session is None:
            raise RuntimeUnavailable("onnxruntime session not loaded")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, batch)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# Triton/gRPC status codes that mean "not now" rather than "never".
_UNAVAILABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "ABORTED")
_UNAVAILABLE_TEXT = ("unknown model", "is not ready", "not found", "unavailable", "connect", "stub process")


def is_transient_triton_error(exc: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, (ConnectionError, OSError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "").upper()
        text = str(exc.message() or "").lower()
        return any(code in status for code in _UNAVAILABLE_CODES) or any(t in text for t in _UNAVAILABLE_TEXT)
    return False


class TritonRuntime(InferenceRuntime):
    """Triton Inference Server over async gRPC (tritonclient.grpc.aio)."""

    kind = "triton"
    max_concurrency = 4

    def __init__(self, url: str, repository: ModelRepository, version: str = "", timeout_s: float = 30.0) -> None:
        super().__init__(repository)
        self.url = url
        self.requested_version = version
        self.timeout_s = timeout_s
        self.client: Any = None
        self._input_size = 0
        self._version = ""
        self._last_check = 0.0
        self._ready = False

    @property
    def input_size(self) -> int:
        if not self._input_size:
            raise RuntimeUnavailable("Triton model configuration not known yet")
        return self._input_size

    @property
    def model_version(self) -> str:
        return self._version

    def _make_client(self) -> Any:
        import tritonclient.grpc.aio as grpcclient

        # Reconnect quickly after a Triton restart (gRPC's default back-off grows to 2 minutes).
        channel_args = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ]
        return grpcclient.InferenceServerClient(self.url, channel_args=channel_args)

    async def start(self) -> None:
        self.client = self._make_client()
        try:
            await self.refresh()
        except RuntimeUnavailable as exc:  # Triton may come up after us: keep going, not ready yet
            log.warning("Triton not ready at start", extra={"url": self.url, "error": str(exc)})

    async def refresh(self) -> None:
        """Ask Triton for the model's input size and the version(s) it has ready."""
        try:
            meta = await self.client.get_model_metadata(
                self.repository.name, self.requested_version, as_json=True, client_timeout=5
            )
        except Exception as exc:
            self._ready = False
            if is_transient_triton_error(exc):
                raise RuntimeUnavailable(f"Triton metadata: {exc}") from exc
            raise
        image = next((i for i in meta.get("inputs", []) if i.get("name") == "image"), None)
        if image is None:
            raise RuntimeError(f"Triton model {self.repository.name} has no input 'image': {meta}")
        self._input_size = int(image["shape"][-1])
        versions = sorted((str(v) for v in meta.get("versions", [])), key=lambda v: int(v) if v.isdigit() else 0)
        if versions:
            self._version = self.requested_version or versions[-1]
        self._ready = True
        self._last_check = time.monotonic()

    async def ready(self) -> bool:
        if self.client is None:
            return False
        try:
            ok = await self.client.is_model_ready(self.repository.name, self.requested_version, client_timeout=3)
        except Exception:
            ok = False
        if ok and (not self._ready or time.monotonic() - self._last_check > 30):
            try:
                await self.refresh()
            except Exception:
                ok = False
        self._ready = bool(ok)
        return self._ready

    async def infer(self, batch: np.ndarray) -> InferOutput:
        import tritonclient.grpc.aio as grpcclient

        if self.client is None:
            raise RuntimeUnavailable("Triton client not started")
        if not self._ready:
            await self.refresh()
        inp = grpcclient.InferInput("image", list(batch.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        outputs = [grpcclient.InferRequestedOutput("logit"), grpcclient.InferRequestedOutput("cam")]
        try:
            result = await self.client.infer(
                self.repository.name,
                [inp],
                model_version=self.requested_version,
                outputs=outputs,
                client_timeout=self.timeout_s,
            )
        except Exception as exc:
            if is_transient_triton_error(exc):
                self._ready = False
                raise RuntimeUnavailable(f"Triton: {exc}") from exc
            if "INVALID_ARG" in str(getattr(exc, "status", lambda: "")() or "").upper():
                self._ready = False  # e.g. a new version with another input size: re-read the config
            raise
        n = batch.shape[0]
        logits = np.asarray(result.as_numpy("logit"), np.float32).reshape(n)
        cams = np.asarray(result.as_numpy("cam"), np.float32)
        cams = cams.reshape(n, *cams.shape[-2:])
        version = str(result.get_response().model_version or self._version)
        self._version = version
        try:
            self.repository.get(version)
        except ModelNotFound as exc:
            # a deployment error (repository not mounted here, or not synced yet), not a message
            # error: hold the messages and retry like an outage, /healthz shows it
            raise RuntimeUnavailable(f"Triton answered with version {version} but {exc}") from exc
        return InferOutput(logits, cams, version)

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            finally:
                self.client = None


def make_runtime(settings: Any) -> InferenceRuntime:
    """Triton when PT_INFERENCE_TRITON_URL is set, else onnxruntime in-process."""
    repository = ModelRepository(settings.model_repository, settings.model_name)
    if settings.triton_url:
        return TritonRuntime(
            settings.triton_url, repository, version=settings.model_version, timeout_s=settings.triton_timeout_s
        )
    return OnnxRuntime(repository, version=settings.model_version, threads=settings.ort_threads, spin=settings.ort_spin)
