"""Ingest settings (env prefix PT_INGEST_, e.g. PT_INGEST_PORT); shared ones (PT_DATA_DIR, PT_AMQP_URL...)
come from CommonSettings with the plain PT_ prefix."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import SettingsConfigDict

from services.core.settings import CommonSettings


class IngestSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="PT_INGEST_", env_file=".env", extra="ignore")

    # Our DICOM application entity: title, TCP port and bind address.
    ae_title: str = "PNEUMOTRIAGE"
    port: int = 11112
    host: str = "0.0.0.0"
    # /healthz and /metrics.
    http_port: int = 8001
    # SCP processes sharing the DICOM port (services/ingest/workers.py); about one per CPU core.
    # Association limits below apply per process.
    workers: int = 1
    # Worker k (1..workers-1) serves its own /healthz and /metrics on worker_http_port_base + k - 1;
    # 0 = a free port each, listed in the primary's /healthz (checks.workers.http_ports).
    worker_http_port_base: int = 0
    # Calling AE titles allowed to associate, comma-separated; empty = any (logged: set it in production).
    allowed_calling_aes: str = ""
    # Storage commitment (services/ingest/commitment.py): where each requestor's N-EVENT-REPORT goes,
    # "AE=host:port" comma-separated, on a new association; one not listed gets it on its own
    # association if that is still open.
    commitment_peers: str = ""
    # Association policy. max_associations counts negotiated associations (A-ASSOCIATE-RQ received);
    # connections that have not sent one yet are bounded by max_pending_connections (the oldest is
    # closed when a new one arrives) and closed after request_timeout_s.
    max_associations: int = 16
    max_associations_per_peer: int = 8
    max_pending_connections: int = 16
    request_timeout_s: float = 5.0
    # Largest P-DATA PDU we receive (also what we announce); a longer one aborts the association.
    max_pdu_bytes: int = 65536 * 4
    # Largest data set of one instance in bytes; unset = max_pixels * 3 + 16 MiB (8-bit colour or
    # 16-bit grayscale at max_pixels, plus header room). Larger ones are aborted while arriving.
    max_instance_bytes: int | None = None
    # Hand-written C-STORE fast path under pynetdicom (services/ingest/wire/pdu_reader.py): our PDU
    # reader streams each data set to disk and answers C-STORE past pynetdicom's DIMSE layer. false =
    # pynetdicom's own reading and DIMSE path (with the same message guard); proven equal by
    # tests/integration/test_ingest_wire_differential.py. Also off when pynetdicom lacks an internal
    # the fast path touches (checked at start-up, logged).
    fast_path: bool = True
    # A PDU must arrive whole within this many seconds of its first byte (fast path; bytes trickling
    # in do not extend it); else the association is aborted.
    pdu_timeout_s: float = 30.0
    # At the association limit a new association closes one that has been stalled in the middle of
    # a PDU for stall_evict_s, else the one idle between messages the longest (at least idle_evict_s).
    stall_evict_s: float = 1.0
    idle_evict_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    # Acceptance policy (DESIGN "Ingest acceptance").
    triage_modalities: str = "CR,DX"
    triage_views: str = "PA,AP"
    # BodyPartExamined values that count as chest; when the tag is empty, a SeriesDescription /
    # StudyDescription matching chest_description_pattern (case-insensitive regex) counts too.
    chest_body_parts: str = "CHEST,THORAX"
    chest_description_pattern: str = r"chest|thorax|cxr|lung|pulm"
    # A non-image instance in a routed study (the study's own SR, a CT, a PDF: a SOP class not in
    # validate.py's IMAGE_SOP_CLASSES): "refuse" answers 0x0122; "accept-and-discard" answers 0x0000,
    # stores nothing, counts it (pt_ingest_discarded_total) and records it as discarded
    # (docs/dicom-conformance.md 2.3: what the sender then no longer learns).
    out_of_scope: Literal["refuse", "accept-and-discard"] = "refuse"
    # Oldest age (years) inside the model's intended use; older patients are triaged but marked.
    max_intended_age_years: int = 17
    # Refuse images with more pixels than this (rows * columns * frames) or a side longer than max_side.
    max_pixels: int = 60_000_000
    max_side: int = 16384
    # Seconds the outbox relay waits after a commit before publishing, to send a burst as one batch.
    relay_coalesce_s: float = 0.2
    # Seconds a C-STORE waits for the store + DB commit before answering 0xA700.
    commit_timeout_s: float = 60.0
    # Lanes (services/ingest/lane_rules.py): false = every image fresh (one first-in first-out lane).
    lanes: bool = True
    # An image acquired more than this many hours ago is backfill (unless its C-STORE Priority is HIGH).
    backfill_age_h: float = 24.0
    # Calling AE titles whose images are always backfill (migration / archive senders), comma-separated.
    backfill_aes: str = ""

    def __init__(self, **values: object) -> None:
        # PT_DATA_DIR, PT_AMQP_URL, PT_DATABASE_URL ... are shared: read them with the common prefix first.
        common = CommonSettings()
        merged = {k: getattr(common, k) for k in CommonSettings.model_fields if k not in values}
        merged.update(values)
        super().__init__(**merged)

    @property
    def instance_byte_limit(self) -> int:
        if self.max_instance_bytes is not None and self.max_instance_bytes > 0:
            return self.max_instance_bytes
        return self.max_pixels * 3 + (16 << 20)

    @staticmethod
    def _split(value: str) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in value.split(",") if v.strip())

    @property
    def allowed_calling_ae_list(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.allowed_calling_aes.split(",") if v.strip())

    @property
    def backfill_ae_set(self) -> frozenset[str]:
        return frozenset(self._split(self.backfill_aes))

    @property
    def triage_modality_set(self) -> frozenset[str]:
        return frozenset(self._split(self.triage_modalities))

    @property
    def triage_view_set(self) -> frozenset[str]:
        return frozenset(self._split(self.triage_views))

    @property
    def chest_body_part_set(self) -> frozenset[str]:
        return frozenset(self._split(self.chest_body_parts))
