"""The aggregator's tables: per-image evidence, per-study triage state, its audit trail, clinician
reviews, SR deliveries and the outbox. Every table is prefixed "aggregator_"."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, mapped_column

from services.aggregator.flags import PENDING
from services.core.db.base import make_base
from services.core.db.outbox import OutboxMixin, utcnow

Base = make_base("aggregator")

UID = String(64)


class Study(Base):
    """The current triage result of one study (one row per StudyInstanceUID)."""

    __tablename__ = "aggregator_studies"

    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    flag: Mapped[str] = mapped_column(String(32), default=PENDING, index=True)
    urgency: Mapped[int] = mapped_column(Integer, default=99, index=True)  # sort key, 0 = most urgent
    p_pneumonia: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    revision: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[str] = mapped_column(String(64), default="")
    human_judgments: Mapped[int] = mapped_column(Integer, default=0)
    outside_intended_use: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set by a clinician's confirm/overrule: the flag is theirs until they change it again.
    overridden_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    arrived_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    first_flag_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # fresh | backfill (services/core/lanes.py): the lane of the study's first event; the worklist
    # shows backfill studies behind a filter, not mixed into today's list.
    lane: Mapped[str] = mapped_column(String(16), default="fresh", server_default="fresh", index=True)


class Image(Base):
    """One SOP instance and what ingest said about it."""

    __tablename__ = "aggregator_images"

    sop_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("aggregator_studies.study_uid"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, default="")
    storage_uri: Mapped[str] = mapped_column(Text, default="")
    sha256: Mapped[str] = mapped_column(String(64), default="")
    # None until image.received / image.rejected arrives (a prediction can come first).
    eligible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    not_triaged_reason: Mapped[str] = mapped_column(Text, default="")
    outside_intended_use: Mapped[bool] = mapped_column(Boolean, default=False)
    intended_use_note: Mapped[str] = mapped_column(Text, default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    patient_age_years: Mapped[int] = mapped_column(Integer, default=-1)
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    p_fused: Mapped[float | None] = mapped_column(Float, nullable=True)
    flag: Mapped[str] = mapped_column(String(32), default=PENDING)
    reason: Mapped[str] = mapped_column(Text, default="")


class PredictionRow(Base):
    """Every model prediction ever received (one per image and model version)."""

    __tablename__ = "aggregator_predictions"
    __table_args__ = (UniqueConstraint("sop_uid", "model_name", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_uid: Mapped[str] = mapped_column(UID, index=True)
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    logit: Mapped[float] = mapped_column(Float, default=0.0)
    runtime: Mapped[str] = mapped_column(String(32), default="")
    heatmap_uri: Mapped[str] = mapped_column(Text, default="")
    predicted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The inference input gate: "ok" | "borderline" | "refuse" ("" = no gate ran), and why.
    gate_verdict: Mapped[str] = mapped_column(String(16), default="", server_default="")
    gate_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    gate_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A re-score (`pneumotriage triage rescore`): this withdrawn version's prediction was replaced by
    # the named version's, for the reason given; it no longer counts ("" = it counts).
    superseded_by: Mapped[str] = mapped_column(String(64), default="", server_default="")
    superseded_reason: Mapped[str] = mapped_column(Text, default="", server_default="")


class JudgmentRow(Base):
    """One annotator's answer (keyed by judgment_id: a redelivery changes nothing)."""

    __tablename__ = "aggregator_judgments"

    judgment_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    sop_uid: Mapped[str] = mapped_column(UID, index=True)
    annotator_id: Mapped[str] = mapped_column(String(100), default="")
    answer: Mapped[str] = mapped_column(String(16))  # pneumonia | healthy | cant_tell
    confidence: Mapped[str] = mapped_column(String(16), default="")  # sure | probably | ""
    trust: Mapped[float] = mapped_column(Float, default=0.5)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    has_click: Mapped[bool] = mapped_column(Boolean, default=False)
    click_x: Mapped[float] = mapped_column(Float, default=0.0)
    click_y: Mapped[float] = mapped_column(Float, default=0.0)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LabelAggregateRow(Base):
    """The labeling service's aggregate for an image (one row per revision)."""

    __tablename__ = "aggregator_label_aggregates"
    __table_args__ = (UniqueConstraint("sop_uid", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_uid: Mapped[str] = mapped_column(UID, index=True)
    revision: Mapped[int] = mapped_column(Integer)
    p_pneumonia: Mapped[float] = mapped_column(Float)
    judgments: Mapped[int] = mapped_column(Integer, default=0)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    method: Mapped[str] = mapped_column(String(32), default="")


class TriageHistory(Base):
    """Audit trail: every change of a study's result, with why and on which evidence."""

    __tablename__ = "aggregator_triage_history"
    __table_args__ = (UniqueConstraint("study_uid", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    revision: Mapped[int] = mapped_column(Integer)
    flag: Mapped[str] = mapped_column(String(32))
    previous_flag: Mapped[str] = mapped_column(String(32))
    p_pneumonia: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(32), default="policy")  # policy | clinician
    trigger: Mapped[str] = mapped_column(String(200), default="")  # the event (message id) behind it
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Review(Base):
    """A clinician's confirm/overrule of a study's flag: stored and exported as a high-trust label."""

    __tablename__ = "aggregator_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(16))  # confirm | overrule
    flag_before: Mapped[str] = mapped_column(String(32))
    flag_after: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(16))  # pneumonia | healthy | cant_tell
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SrDelivery(Base):
    """A DICOM SR to send for a study revision (retried until the destination accepts it)."""

    __tablename__ = "aggregator_sr_deliveries"
    __table_args__ = (UniqueConstraint("study_uid", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    revision: Mapped[int] = mapped_column(Integer)
    sop_uid: Mapped[str] = mapped_column(UID, default="")
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | sent | superseded
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The revision's flag and whether a clinician verified it: a revision that says what the last
    # frozen SR already said (a flip undone within the settle time) is superseded, never sent.
    flag: Mapped[str] = mapped_column(String(32), default="", server_default="")
    verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Held until then (the settle time; URGENT: at once).
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The SR as sent, frozen (DICOM Part 10 bytes) when it leaves the hold: every attempt sends
    # these same bytes; None while held. Its predecessor in the study's chain, if any.
    dataset: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    predecessor_sop_uid: Mapped[str] = mapped_column(UID, default="", server_default="")


class SrSend(Base):
    """One frozen SR revision for one destination (PT_AGGREGATOR_SR_DESTINATION may name several):
    each destination has its own queue, breaker and progress, so a silent PACS never holds up
    another one. The delivery is "sent" once every send of it is."""

    __tablename__ = "aggregator_sr_sends"
    __table_args__ = (UniqueConstraint("delivery_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(Integer, index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)  # Destination.key
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | sent
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SrDeliveryObject(Base):
    """Another DICOM object sent with an SR revision, before it, on the same association: a heatmap
    Secondary Capture per judged image (PT_AGGREGATOR_SEND_HEATMAP_SC). Frozen with the SR (Part 10
    bytes), so every attempt sends the same content under the same SOP Instance UID."""

    __tablename__ = "aggregator_sr_delivery_objects"
    __table_args__ = (UniqueConstraint("delivery_id", "sop_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(Integer, index=True)
    sop_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    dataset: Mapped[bytes] = mapped_column(LargeBinary)


class Refusal(Base):
    """An image ingest refused (image.rejected): an expected outcome, counted for operators. One row
    per SOP instance and reason code (ingest sends one event per pair; a redelivery changes nothing).
    The study UID is empty when ingest refused the instance before it could read it (e.g. a CT)."""

    __tablename__ = "aggregator_refusals"
    __table_args__ = (UniqueConstraint("sop_uid", "reason_code"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_uid: Mapped[str] = mapped_column(UID)
    reason_code: Mapped[str] = mapped_column(String(64), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    dicom_status: Mapped[int] = mapped_column(Integer, default=0)
    sop_class_uid: Mapped[str] = mapped_column(UID, default="")
    study_uid: Mapped[str] = mapped_column(UID, default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    """A worklist user (clinician or admin); the password is stored only as a hash."""

    __tablename__ = "aggregator_users"

    username: Mapped[str] = mapped_column(String(100), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    # raised at every sign-out: cookies signed with an older epoch are refused (services/core/auth.py)
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Outbox(OutboxMixin, Base):
    __tablename__ = "aggregator_outbox"
