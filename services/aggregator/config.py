"""Aggregator settings (env prefix PT_AGGREGATOR_, e.g. PT_AGGREGATOR_HTTP_PORT)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from services.core.auth import AuthSettings

DEFAULT_POLICY_FILE = Path(__file__).resolve().parent / "policy.yaml"
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository"


class AggregatorSettings(AuthSettings):
    model_config = SettingsConfigDict(env_prefix="PT_AGGREGATOR_", env_file=".env", extra="ignore")

    # Web worklist, JSON API, /healthz and /metrics.
    http_port: int = 8004
    # Fusion weights and triage thresholds, written by `pneumotriage triage calibrate`.
    policy_file: Path = DEFAULT_POLICY_FILE
    # Where results go back as DICOM Basic Text SRs: "host:port:AE_TITLE", or several, comma-separated,
    # each optionally named "NAME=host:port:AE_TITLE" (the name, by default the AE title, keys its
    # queue: each destination has its own queue, breaker and sender); unset = no SR.
    sr_destination: str | None = None
    # Our AE title when we send the SR.
    sr_calling_ae: str = "PT_AGGREGATOR"
    # Seconds between SR delivery rounds, and the first back-off after a failed association
    # (doubling per failure up to sr_backoff_max_s, jittered to 50-100 %).
    sr_retry_seconds: float = 5.0
    sr_backoff_max_s: float = 300.0
    # The destination's timeouts: TCP connect, the answer to the association request (ACSE), each
    # C-STORE response (DIMSE). A PACS that accepts TCP and never answers costs one ACSE timeout
    # per attempt, not one per pending SR.
    sr_connect_timeout_s: float = 5.0
    sr_acse_timeout_s: float = 10.0
    sr_dimse_timeout_s: float = 30.0
    # Most SRs sent over one association.
    sr_batch_size: int = 50
    # /healthz says degraded (HTTP 200: the worklist stays served) while the oldest SR not sent
    # is older than this.
    sr_health_max_age_s: float = 600.0
    # Seconds a study's new SR revision is held before it is frozen and sent, so a study still
    # arriving sends one SR per settled change and never a flip undone within it (URGENT: at once).
    sr_settle_s: float = 5.0
    # With each SR revision, a DICOM Secondary Capture per judged image (the X-ray with the heatmap,
    # the flag, P(pneumonia), the model version and "diagnostic aid" burned in; heatmap_sc.py), in
    # the study and a series of its own, frozen with the SR and sent on the same association.
    send_heatmap_sc: bool = False
    # SRs for backfill studies (a catch-up or migration; services/core/lanes.py): sent, marked as a
    # retrospective triage result (true), or none at all (false).
    backfill_sr: bool = True
    # Broker prefetch for aggregator.events (unacked messages in flight; keep it above max_batch).
    prefetch: int = 128
    # Most events applied in one transaction.
    max_batch: int = 64
    # How long the first event of a batch may wait for company (seconds; 0 = take what has arrived).
    # Under load a transaction per few events costs ~1.5 ms of CPU per image more than one per
    # dozens (docs/performance.md); 30 ms is small against the 1 s first-flag SLO.
    max_wait_s: float = 0.03
    # Seconds between worklist refreshes pushed over server-sent events.
    sse_interval_seconds: float = 2.0
    # Drift monitor (services/aggregator/drift.py): where each model version's drift_reference.json
    # is (<dir>/<model>/<version>/), how many recent predictions are compared, from how many on
    # it may fire, and its thresholds; how often it checks.
    drift_reference_dir: Path = DEFAULT_MODEL_REPOSITORY
    drift_window: int = 300
    drift_min_n: int = 100
    drift_psi_alarm: float = 0.25
    drift_rate_z: float = 4.0
    drift_interval_s: float = 30.0
    # The services' /metrics the ops page (/ops) reads each lane's oldest age and drain rate from
    # (comma-separated; the broker's queue depths it reads itself).
    ops_metrics_urls: str = "http://127.0.0.1:8002/metrics,http://127.0.0.1:8003/metrics,http://127.0.0.1:8004/metrics"
    # Versions of this site's recalibration (`pneumotriage triage recalibrate`); default
    # <PT_DATA_DIR>/site-calibration. The active one is read at start.
    site_calibration_dir: Path | None = None

    def resolved_site_calibration_dir(self) -> Path:
        return self.site_calibration_dir or self.data_dir / "site-calibration"

    def __init__(self, **values: object) -> None:
        # PT_DATA_DIR, PT_AMQP_URL, PT_SECRET_KEY ... are shared: read them with the common prefix first.
        common = AuthSettings()
        merged = {k: getattr(common, k) for k in AuthSettings.model_fields if k not in values}
        merged.update(values)
        super().__init__(**merged)
