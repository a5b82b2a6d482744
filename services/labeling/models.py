"""Labeling tables (prefix labeling_). Tasks are addressed by an opaque random id, never by a DICOM UID."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db.base import make_base
from services.core.db.outbox import OutboxMixin, utcnow

Base = make_base("labeling")


def opaque_id() -> str:
    """Random, unguessable and unrelated to any DICOM identifier (so it cannot be joined to PHI)."""
    return secrets.token_urlsafe(12)


class Job(Base):
    __tablename__ = "labeling_jobs"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # name@version
    digest: Mapped[str] = mapped_column(String(32))
    definition: Mapped[str] = mapped_column(Text)  # JSON of the validated YAML
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    __tablename__ = "labeling_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # pseudonymous id used in events and exports (never the sign-in name)
    pseudonym: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: "ann-" + secrets.token_hex(4))
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str] = mapped_column(String(300))
    # active | stopped (under the trust threshold) | quiz_failed
    status: Mapped[str] = mapped_column(String(20), default="active")
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    instructions_seen: Mapped[bool] = mapped_column(Boolean, default=False)
    quiz_attempt: Mapped[int] = mapped_column(Integer, default=0)
    quiz_passed: Mapped[bool] = mapped_column(Boolean, default=False)
    # raised at every sign-out: cookies signed with an older epoch are refused (services/core/auth.py)
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Task(Base):
    __tablename__ = "labeling_tasks"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=opaque_id)
    # work: an image from image.received; gold kinds: example (instructions), quiz, hidden
    kind: Mapped[str] = mapped_column(String(10), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(100), unique=True, nullable=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(100), nullable=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(100), nullable=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(100), nullable=True)
    storage_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # gold: the image file, its dataset label and the reason shown after a miss
    source_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    gold_label: Mapped[str | None] = mapped_column(String(20), nullable=True)
    gold_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_key: Mapped[str] = mapped_column(String(200))
    # open | complete
    status: Mapped[str] = mapped_column(String(10), default="open", index=True)
    needed: Mapped[int] = mapped_column(Integer, default=3)
    judgments: Mapped[int] = mapped_column(Integer, default=0)  # valid judgments behind the current aggregate
    final_label: Mapped[str | None] = mapped_column(String(20), nullable=True)
    p_pneumonia: Mapped[float | None] = mapped_column(Float, nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    method: Mapped[str | None] = mapped_column(String(20), nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # work images: the input gate's verdict (services/core/gate.py), ok | borderline (a refused image
    # gets no task: SkippedImage). NULL: gold, or made with the gate off or before it ran here.
    gate_verdict: Mapped[str | None] = mapped_column(String(12), nullable=True)
    gate_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    gate_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    gate_version: Mapped[str | None] = mapped_column(String(40), nullable=True)


class SkippedImage(Base):
    """An image.received the input gate refused: no crowd task, no judgment, never exported; counted and
    listed with its reason on the owner page (job owners only; annotators never see it)."""

    __tablename__ = "labeling_skipped_images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(100), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(100), nullable=True)
    storage_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gate_check: Mapped[str] = mapped_column(String(20), index=True)  # the rule (services.core.gate.CHECKS)
    reason: Mapped[str] = mapped_column(Text)
    gate_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    gate_version: Mapped[str] = mapped_column(String(40))
    job_key: Mapped[str] = mapped_column(String(200))
    skipped_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lease(Base):
    """A task handed to an annotator (reserved so that concurrent annotators do not over-judge it)."""

    __tablename__ = "labeling_leases"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("labeling_tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("labeling_users.id"), index=True)
    leased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JudgmentRow(Base):
    __tablename__ = "labeling_judgments"
    # one live answer per annotator, image and quiz attempt, even under concurrent double submission
    __table_args__ = (
        Index(
            "uq_labeling_judgments_live",
            "task_id",
            "user_id",
            "context",
            "quiz_attempt",
            unique=True,
            sqlite_where=text("state != 'undone'"),
            postgresql_where=text("state != 'undone'"),
        ),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=opaque_id)
    task_id: Mapped[str] = mapped_column(ForeignKey("labeling_tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("labeling_users.id"), index=True)
    context: Mapped[str] = mapped_column(String(10))  # quiz | work
    quiz_attempt: Mapped[int] = mapped_column(Integer, default=0)
    answer: Mapped[str] = mapped_column(String(20))
    confidence: Mapped[str] = mapped_column(String(20))
    cant_tell_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    click_x: Mapped[float | None] = mapped_column(Float, nullable=True)
    click_y: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds_spent: Mapped[float] = mapped_column(Float, default=0.0)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    correct: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    trust_at_submit: Mapped[float] = mapped_column(Float, default=0.0)
    # pending (can be undone) -> final (published, aggregated) | undone
    state: Mapped[str] = mapped_column(String(10), default="pending", index=True)
    job_key: Mapped[str] = mapped_column(String(200))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Outbox(OutboxMixin, Base):
    __tablename__ = "labeling_outbox"
