"""Inference service settings: PT_INFERENCE_* (plus the common PT_* ones)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.core.gate import DEFAULT_GATE_FILE
from services.core.settings import CommonSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"PT_INFERENCE_{name}", f"pt_inference_{name.lower()}")


class InferenceSettings(CommonSettings):
    model_config = SettingsConfigDict(**CommonSettings.model_config, populate_by_name=True)

    # Triton gRPC endpoint (host:port). Unset: run the ONNX in-process with onnxruntime.
    triton_url: str | None = Field(None, validation_alias=_env("TRITON_URL"))
    # The model repository (Triton layout: <model>/<version>/{model.onnx,metadata.json}). The
    # embedded runtime loads from it; with Triton it is where calibration metadata is read
    # (mount the same volume as Triton's repository).
    model_repository: Path = Field(DEFAULT_MODEL_REPOSITORY, validation_alias=_env("MODEL_REPOSITORY"))
    model_name: str = Field("pneumonia", validation_alias=_env("MODEL_NAME"))
    # Pin a version ("" = the version config.pbtxt pins, else the highest present / Triton's choice).
    model_version: str = Field("", validation_alias=_env("MODEL_VERSION"))
    http_port: int = Field(8002, validation_alias=_env("HTTP_PORT"))
    # Unacked messages in flight (RabbitMQ prefetch); bounds memory and the batch a consumer can form.
    prefetch: int = Field(32, validation_alias=_env("PREFETCH"))
    max_batch: int = Field(16, validation_alias=_env("MAX_BATCH"))
    # How long the first image of a batch waits for company.
    max_wait_ms: float = Field(5.0, validation_alias=_env("MAX_WAIT_MS"))
    # Threads that read, verify and decode DICOM files.
    decode_workers: int = Field(2, validation_alias=_env("DECODE_WORKERS"))
    # Decode in this many worker processes instead (0: threads). Worth it with more cores than the
    # runtime uses (e.g. Triton on a GPU): DICOM parsing is mostly Python and holds the GIL.
    decode_processes: int = Field(0, validation_alias=_env("DECODE_PROCESSES"))
    # onnxruntime intra-op threads for the embedded runtime (0 = onnxruntime's default).
    ort_threads: int = Field(0, validation_alias=_env("ORT_THREADS"))
    # Let onnxruntime's threads busy-wait between runs (faster alone, slower beside the decode threads).
    ort_spin: bool = Field(False, validation_alias=_env("ORT_SPIN"))
    # Where class-activation heatmaps go (default <data_dir>/heatmaps); "" disables them.
    heatmap_dir: Path | None = Field(None, validation_alias=_env("HEATMAP_DIR"))
    heatmaps: bool = Field(True, validation_alias=_env("HEATMAPS"))
    # Triton request timeout, and the cap of the in-process back-off while Triton is unreachable.
    triton_timeout_s: float = Field(30.0, validation_alias=_env("TRITON_TIMEOUT_S"))
    retry_max_backoff_s: float = Field(10.0, validation_alias=_env("RETRY_MAX_BACKOFF_S"))
    # How long a graceful stop waits for in-flight images before closing the broker connection.
    drain_timeout_s: float = Field(20.0, validation_alias=_env("DRAIN_TIMEOUT_S"))

    # The input gate (docs/triage-policy.md#input-gate): refuse / mark borderline what the model may
    # not judge (non-chest, too small, odd field of view). Off only for experiments.
    gate: bool = Field(True, validation_alias=_env("GATE"))
    gate_file: Path = Field(DEFAULT_GATE_FILE, validation_alias=_env("GATE_FILE"))

    # Shadow mode: candidate versions (e.g. "3" or "3,4") scored beside the active one on every live
    # image, embedded (onnxruntime), stored in <data_dir>/shadow/predictions.sqlite for `model compare`,
    # never published (no flag, worklist, SR, FHIR or drift of the active version sees them).
    shadow_versions: str = Field("", validation_alias=_env("SHADOW_VERSIONS"))
    # onnxruntime threads per shadow version (they run beside the active version's).
    shadow_threads: int = Field(1, validation_alias=_env("SHADOW_THREADS"))

    def resolved_gate_file(self) -> Path | None:
        return self.gate_file if self.gate else None

    def resolved_heatmap_dir(self) -> Path | None:
        if not self.heatmaps:
            return None
        return self.heatmap_dir or self.data_dir / "heatmaps"
