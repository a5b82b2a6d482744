"""image.received -> prediction.made: read + verify + preprocess, micro-batch, infer, calibrate, publish.

- `load_image` (decode threads): the stored file must exist and match its sha256, and must decode
  to a 2D image; a mismatch or an undecodable file is a `PermanentError` (dead-letter queue with
  the reason). A missing file is transient (the store may be a volume that is not mounted yet).
- `MicroBatcher`: concurrent messages (RabbitMQ prefetch bounds how many) are stacked into one
  batch of up to `max_batch`, waiting at most `max_wait_ms` for company. While the runtime is
  unavailable (Triton down) the batch is retried in-process with capped exponential back-off and
  the messages stay unacked: nothing is lost and nothing is dead-lettered for an outage.
- `InferenceWorker.handle`: the broker handler. The message is acked (by the broker) only after the
  prediction's publish is confirmed. A redelivered or duplicated message reuses the prediction
  already published by this process (same bytes, same message_id) instead of computing another.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import multiprocessing
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge, Histogram

from services.core.broker import Broker, Envelope, PermanentError
from services.core.contracts import ImageReceived, ImageRef, Prediction, RescoreRequested
from services.core.gate import GateVerdict, gate_image
from services.core.lanes import BACKFILL, FRESH
from services.core.lanes import normalise as normalise_lane
from services.inference.heatmaps import save_heatmap
from services.inference.runtime import InferenceRuntime, InferOutput, RuntimeUnavailable
from services.inference.shadow import ShadowScorer

log = logging.getLogger(__name__)

LATENCY = Histogram(
    "pt_inference_latency_seconds",
    "Per image: read + preprocess + batch wait + inference + calibration (what Prediction.latency_ms says)",
    ["runtime"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STAGE = Histogram(
    "pt_inference_stage_seconds",
    "Time per stage: decode (per image), infer (per batch), heatmap (per image), publish (per image)",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram("pt_inference_batch_size", "Images per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ERRORS = Counter("pt_inference_errors_total", "Errors by kind", ["kind"])
PREDICTIONS = Counter("pt_inference_predictions_total", "Predictions published", ["model_version", "runtime"])
SKIPPED = Counter("pt_inference_skipped_total", "image.received events acked without a prediction", ["reason"])
DUPLICATES = Counter("pt_inference_duplicates_total", "Redelivered/duplicate messages answered from the cache")
GATE = Counter("pt_inference_gate_total", "Input gate verdicts (ok | borderline | refuse)", ["verdict"])
RESCORES = Counter(
    "pt_inference_rescores_total",
    "rescore.requested handled, by outcome (predicted | withdrawn_still_served)",
    ["outcome"],
)
RUNTIME_UP = Gauge("pt_inference_runtime_available", "1 while the model runtime answers, 0 while it is retried")
MODEL_INFO = Gauge(
    "pt_inference_model_info",
    "1 for the model version that answered the latest batch (the one served); one series at a time",
    ["model", "version", "runtime"],
)
_model_info: tuple[str, str, str] | None = None


def mark_served(model: str, version: str, runtime: str) -> None:
    """pt_inference_model_info: the version that answered last, the previous one's series removed."""
    global _model_info
    now = (model, version, runtime)
    if now == _model_info or not version:
        return
    if _model_info is not None:
        with contextlib.suppress(KeyError):
            MODEL_INFO.remove(*_model_info)
    MODEL_INFO.labels(*now).set(1)
    _model_info = now


@dataclass
class LoadedImage:
    tensor: np.ndarray  # [1, S, S] float32
    rows: int
    columns: int
    gate: GateVerdict | None = None  # the input gate's verdict (None: gate off)


class BadImage(PermanentError):
    """The stored image can never be predicted (kind: sha256_mismatch | undecodable | bad_uri)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(kind, reason)  # both in args: survives pickling from a decode process
        self.kind = kind
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def storage_path(uri: str) -> Path:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    raise BadImage("bad_uri", f"unsupported storage URI scheme {parsed.scheme!r}")


def load_image(uri: str, sha256: str, input_size: int, gate_file: str | None = None) -> LoadedImage:
    """Read the stored DICOM, verify its sha256, decode and preprocess it (in a decode thread or
    process). Raises BadImage for what can never succeed, FileNotFoundError (transient) otherwise."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    from services.core.imaging import display_array
    from services.inference.preprocess import preprocess_array

    path = storage_path(uri)
    try:
        data = path.read_bytes()
    except IsADirectoryError as exc:
        raise BadImage("bad_uri", f"storage URI is a directory: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256.lower():
        raise BadImage("sha256_mismatch", f"sha256 mismatch: stored file has {digest}, event says {sha256}")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, columns = int(ds.Rows), int(ds.Columns)
        display = display_array(ds)  # once: the gate's preview is this image when no subsampling is due
        tensor = preprocess_array(display, input_size)
    except (
        InvalidDicomError,
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        NotImplementedError,
        RuntimeError,
        EOFError,
        OSError,
    ) as exc:
        raise BadImage("undecodable", f"undecodable image: {type(exc).__name__}: {exc}"[:500]) from exc
    if tensor.shape != (1, input_size, input_size) or not np.all(np.isfinite(tensor)):
        raise BadImage("undecodable", f"preprocessing produced an unusable tensor {tensor.shape}")
    gate = gate_image(ds, gate_file, display) if gate_file else None
    return LoadedImage(np.ascontiguousarray(tensor, dtype=np.float32), rows, columns, gate)


def _warm_decode_process() -> None:
    import pydicom  # noqa: F401

    import services.inference.preprocess  # noqa: F401


@dataclass
class BatchItem:
    logit: float
    cam: np.ndarray
    model_version: str
    batch_size: int


Queued = tuple[int, int, np.ndarray, "asyncio.Future[BatchItem]"]


class MicroBatcher:
    """Collects concurrently submitted tensors into batches for the runtime."""

    def __init__(
        self,
        runtime: InferenceRuntime,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.runtime = runtime
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.max_backoff_s = max_backoff_s
        # (lane rank: 0 fresh, 1 backfill; arrival; tensor; future): a fresh image joins the next batch
        # ahead of backfill images already waiting here (services/core/lanes.py)
        self._queue: asyncio.PriorityQueue[Queued] = asyncio.PriorityQueue()
        self._arrivals = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max(1, runtime.max_concurrency))
        self._inflight: set[asyncio.Task[None]] = set()
        self.available = True
        self.retrying_since: float | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="inference-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        while not self._queue.empty():
            *_, fut = self._queue.get_nowait()
            if not fut.done():
                fut.cancel()

    async def submit(self, tensor: np.ndarray, lane: str = FRESH) -> BatchItem:
        fut: asyncio.Future[BatchItem] = asyncio.get_running_loop().create_future()
        await self._queue.put((1 if lane == BACKFILL else 0, next(self._arrivals), tensor, fut))
        return await fut

    async def _collect(self) -> list[Queued]:
        items = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return items

    async def _run(self) -> None:
        while True:
            queued = [q for q in await self._collect() if not q[3].done()]
            if not queued:
                continue
            # a runtime may change input size (new model version): batch only equal shapes
            shape = queued[0][2].shape
            same = [(q[2], q[3]) for q in queued if q[2].shape == shape]
            for other in (q for q in queued if q[2].shape != shape):
                self._queue.put_nowait(other)
            await self._slots.acquire()
            task = asyncio.create_task(self._infer(same))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _infer(self, items: list[tuple[np.ndarray, asyncio.Future[BatchItem]]]) -> None:
        try:
            batch = np.stack([t for t, _ in items]).astype(np.float32, copy=False)
            try:
                out = await self._infer_until_available(batch, [f for _, f in items])
            except asyncio.CancelledError:
                for _, fut in items:
                    if not fut.done():
                        fut.cancel()
                raise
            except Exception as exc:
                ERRORS.labels("runtime_error").inc()
                log.error("inference failed", extra={"batch": len(items), "error": repr(exc)})
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            BATCH_SIZE.observe(len(items))
            mark_served(self.runtime.repository.name, out.model_version, self.runtime.kind)
            for i, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result(BatchItem(float(out.logits[i]), out.cams[i], out.model_version, len(items)))
        finally:
            self._slots.release()

    async def _infer_until_available(self, batch: np.ndarray, futures: list[asyncio.Future[BatchItem]]) -> InferOutput:
        backoff = 0.2
        while True:
            started = time.perf_counter()
            try:
                out = await self.runtime.infer(batch)
            except RuntimeUnavailable as exc:
                ERRORS.labels("runtime_unavailable").inc()
                if all(f.done() for f in futures):  # everybody gave up (shutdown): stop retrying
                    raise asyncio.CancelledError from exc
                if self.available:
                    log.warning("runtime unavailable, retrying in-process", extra={"error": str(exc)[:300]})
                    self.retrying_since = time.monotonic()
                self.available = False
                RUNTIME_UP.set(0)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            STAGE.labels("infer").observe(time.perf_counter() - started)
            if not self.available:
                log.info(
                    "runtime available again",
                    extra={"outage_s": round(time.monotonic() - (self.retrying_since or 0), 1)},
                )
            self.available = True
            self.retrying_since = None
            RUNTIME_UP.set(1)
            return out


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class Pipeline:
    """ImageReceived -> Prediction, without the broker (benchmarked on its own in bench/inference.py)."""

    def __init__(
        self,
        runtime: InferenceRuntime,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        decode_workers: int = 2,
        heatmap_dir: Path | None = None,
        max_backoff_s: float = 10.0,
        decode_processes: int = 0,
        gate_file: Path | None = None,
        shadow: ShadowScorer | None = None,
    ) -> None:
        self.runtime = runtime
        # shadow versions (services/inference/shadow.py): scored after the active prediction, stored
        # locally, never part of the Prediction this returns
        self.shadow = shadow
        self.gate_file = str(gate_file) if gate_file else None  # the input gate (services/core/gate.py)
        self.batcher = MicroBatcher(runtime, max_batch, max_wait_ms, max_backoff_s)
        self.decode_pool = ThreadPoolExecutor(max_workers=max(1, decode_workers), thread_name_prefix="decode")
        # DICOM parsing is mostly Python (GIL-bound): processes let decoding use more than one core.
        self.process_pool: ProcessPoolExecutor | None = None
        if decode_processes > 0:
            self.process_pool = ProcessPoolExecutor(
                max_workers=decode_processes,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_warm_decode_process,
            )
        self.heatmap_dir = heatmap_dir

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        if self.shadow is not None:
            await self.shadow.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.process_pool is not None:
            self.process_pool.shutdown(wait=False, cancel_futures=True)

    async def predict(self, event: ImageReceived, shadow: bool = False) -> Prediction:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        image = event.image
        try:
            loaded = await loop.run_in_executor(
                self.process_pool or self.decode_pool,
                load_image,
                image.storage_uri,
                image.sha256,
                self.runtime.input_size,
                self.gate_file,
            )
        except BadImage as exc:
            ERRORS.labels(exc.kind).inc()
            raise
        except FileNotFoundError:
            ERRORS.labels("missing_file").inc()
            raise
        STAGE.labels("decode").observe(time.perf_counter() - started)
        item = await self.batcher.submit(loaded.tensor, normalise_lane(image.lane))
        try:
            model = self.runtime.model(item.model_version)
        except Exception:
            ERRORS.labels("calibration").inc()
            raise
        probability = float(model.calibration.apply(item.logit))
        latency_ms = (time.perf_counter() - started) * 1000.0
        LATENCY.labels(self.runtime.kind).observe(latency_ms / 1000.0)
        heatmap_uri = ""
        if self.heatmap_dir is not None:
            t0 = time.perf_counter()
            try:
                heatmap_uri = await loop.run_in_executor(
                    self.decode_pool,
                    save_heatmap,
                    self.heatmap_dir,
                    image.sop_instance_uid,
                    item.cam,
                    loaded.rows,
                    loaded.columns,
                    loaded.tensor.shape[-1],
                    model.name,
                    model.version,
                )
            except OSError as exc:  # a full disk must not stop triage: publish without the heatmap
                ERRORS.labels("heatmap").inc()
                log.error("heatmap not written", extra={"error": repr(exc)})
            STAGE.labels("heatmap").observe(time.perf_counter() - t0)
        prediction = Prediction(
            image=ImageRef(),
            probability=probability,
            logit=item.logit,
            model_name=model.name,
            model_version=model.version,
            runtime=self.runtime.kind,
            latency_ms=latency_ms,
            heatmap_uri=heatmap_uri,
            predicted_at=_now(),
        )
        if loaded.gate is not None:
            GATE.labels(loaded.gate.verdict).inc()
            prediction.gate_verdict = loaded.gate.verdict
            prediction.gate_reason = loaded.gate.reason
            prediction.gate_score = loaded.gate.score or 0.0
            prediction.gate_version = loaded.gate.version
        prediction.image.CopyFrom(image)
        if event.HasField("received_at"):
            prediction.received_at.CopyFrom(event.received_at)
        if shadow and self.shadow is not None:
            # a copy: nothing the shadow does can touch the prediction that is published
            self.shadow.submit(Prediction.FromString(prediction.SerializeToString()), loaded.tensor)
        return prediction


def message_id(prediction: Prediction) -> str:
    base = f"inference:{prediction.image.sop_instance_uid}:{prediction.model_version}"
    if prediction.rescore_request_id:  # a re-score is a new answer, never a duplicate of the first one
        return f"{base}:rescore:{prediction.rescore_request_id}"
    return base


def as_image_received(request: RescoreRequested) -> ImageReceived:
    """What the pipeline needs of a re-score request: the stored image (and when ingest took it)."""
    event = ImageReceived(image=request.image, triage_eligible=True)
    if request.HasField("received_at"):
        event.received_at.CopyFrom(request.received_at)
    return event


class InferenceWorker:
    """The broker handler around a Pipeline: skip, dedupe, predict, publish (confirmed)."""

    def __init__(self, broker: Broker, pipeline: Pipeline, recent_size: int = 10_000) -> None:
        self.broker = broker
        self.pipeline = pipeline
        self.recent: OrderedDict[tuple[str, str], Prediction] = OrderedDict()
        self.recent_size = recent_size
        self._inflight: dict[tuple[str, str], asyncio.Future[Prediction]] = {}
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopping = False
        self._released = asyncio.Event()

    async def publish(self, prediction: Prediction) -> None:
        t0 = time.perf_counter()
        try:
            await self.broker.publish(
                "prediction.made",
                prediction,
                message_id=message_id(prediction),
                correlation_id=prediction.image.sop_instance_uid,
            )
        except Exception:
            ERRORS.labels("publish").inc()
            raise
        STAGE.labels("publish").observe(time.perf_counter() - t0)

    async def handle(self, envelope: Envelope) -> None:
        if self.stopping:
            # Shutting down: hold the message unacked until the connection is closed (which returns
            # it to the queue), then end without an ack.
            await self._released.wait()
            raise asyncio.CancelledError
        self._active += 1
        self._idle.clear()
        try:
            await self._handle(envelope)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _handle(self, envelope: Envelope) -> None:
        event = envelope.payload
        if isinstance(event, RescoreRequested):
            await self._rescore(event)
            return
        if not isinstance(event, ImageReceived):
            raise PermanentError(
                f"inference consumes image.received and rescore.requested only, got {type(event).__name__}"
            )
        if not event.triage_eligible:
            SKIPPED.labels("not_triage_eligible").inc()
            return
        image = event.image
        if not image.sop_instance_uid or not image.storage_uri:
            raise PermanentError("image.received without sop_instance_uid or storage_uri")
        key = (image.sop_instance_uid, image.sha256)

        async def produce() -> Prediction:
            prediction = await self.pipeline.predict(event, shadow=True)
            await self.publish(prediction)
            return prediction

        prediction = await self._once(key, produce, envelope.redelivered)
        if prediction is not None:
            log.info(
                "prediction published",
                extra={
                    "probability": round(prediction.probability, 4),
                    "model_version": prediction.model_version,
                    "runtime": prediction.runtime,
                    "latency_ms": round(prediction.latency_ms, 1),
                },
            )

    async def _once(
        self, key: tuple[str, str], produce: Callable[[], Awaitable[Prediction]], redelivered: bool = False
    ) -> Prediction | None:
        """One prediction per key while it is remembered (image.received and rescore.requested alike):
        a duplicate delivery, of one just answered (`recent`) or of one being answered right now
        (`_inflight`, shared), publishes that same prediction again and returns None; otherwise
        `produce()` makes and publishes it, and it is remembered and returned."""
        cached = self.recent.get(key)
        if cached is None and key in self._inflight:
            with contextlib.suppress(Exception):  # the same request being answered right now: share it
                cached = await asyncio.shield(self._inflight[key])
        if cached is not None:
            DUPLICATES.inc()
            log.info("duplicate delivery: republishing the same prediction", extra={"redelivered": redelivered})
            await self.publish(cached)
            return None
        fut: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
        self._inflight[key] = fut
        try:
            prediction = await produce()
        except Exception as exc:
            fut.set_exception(exc)
            raise
        except BaseException:
            fut.cancel()
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(prediction)
        self.recent[key] = prediction
        while len(self.recent) > self.recent_size:
            self.recent.popitem(last=False)
        PREDICTIONS.labels(prediction.model_version, prediction.runtime).inc()
        return prediction

    async def _rescore(self, request: RescoreRequested) -> None:
        """Predict a stored image again with the version served now (a withdrawn version's studies).

        Never answered from the duplicate cache of image.received (that holds the withdrawn version's
        prediction: the key differs); a redelivered request (same request id) reuses its own re-score.
        Served still by the withdrawn version (rolled back but not restarted): dead-lettered with the
        reason, nothing published, so the withdrawn version can never "re-score" itself."""
        image = request.image
        if not image.sop_instance_uid or not image.storage_uri or not request.withdrawn_model_version:
            raise PermanentError("rescore.requested without sop_instance_uid, storage_uri or withdrawn version")
        key = (image.sop_instance_uid, f"rescore:{request.request_id}:{image.sha256}")

        async def produce() -> Prediction:
            prediction = await self.pipeline.predict(as_image_received(request))
            if prediction.model_version == request.withdrawn_model_version:
                RESCORES.labels("withdrawn_still_served").inc()
                raise PermanentError(
                    f"re-score asked to replace model version {request.withdrawn_model_version}, which is still"
                    " the version served: roll back (model deploy --version <previous>) and restart inference first"
                )
            prediction.rescore_of_model_version = request.withdrawn_model_version
            prediction.rescore_reason = request.reason
            prediction.rescore_request_id = request.request_id
            await self.publish(prediction)
            return prediction

        prediction = await self._once(key, produce)
        if prediction is not None:
            RESCORES.labels("predicted").inc()
            log.info(
                "re-score published",
                extra={
                    "probability": round(prediction.probability, 4),
                    "model_version": prediction.model_version,
                    "withdrawn_model_version": request.withdrawn_model_version,
                },
            )

    def release(self) -> None:
        """After the broker connection is closed: let held handlers end (their messages were requeued)."""
        self._released.set()

    async def drain(self, timeout: float) -> bool:
        """Stop taking new messages and wait for in-flight ones (True when all finished)."""
        self.stopping = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
