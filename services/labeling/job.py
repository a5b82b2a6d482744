"""The job definition: a versioned YAML file, validated with pydantic, recorded in the DB at start."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from services.labeling.config import DEFAULT_JOB_FILE

ANSWERS = ("pneumonia", "healthy", "cant_tell")
CONFIDENCES = ("sure", "probably")


class Option(BaseModel):
    value: str
    label: str
    key: str
    help: str = ""


class Redundancy(BaseModel):
    judgments_per_image: int = Field(3, ge=1)
    max_judgments: int = Field(7, ge=1)
    target_confidence: float = Field(0.95, gt=0.5, le=1.0)
    em_min_judgments: int = Field(20, ge=0)


class Gold(BaseModel):
    hidden_ratio: float = Field(0.2, ge=0.0, lt=1.0)
    examples_per_class: int = Field(2, ge=0)
    quiz_length: int = Field(8, ge=0)
    quiz_pass_mark: float = Field(0.75, ge=0.0, le=1.0)
    quiz_attempts: int = Field(2, ge=1)  # a retake draws quiz items the annotator has not seen
    # a hidden test question's result is shown only after this many further answers (or when the
    # annotator's session is over), so an answer's response never tells gold from work
    feedback_delay: int = Field(10, ge=1)
    contested_min_trusted: int = Field(3, ge=1)
    contested_share: float = Field(0.5, gt=0.0, le=1.0)


class Trust(BaseModel):
    prior_correct: float = Field(4.0, gt=0)
    prior_wrong: float = Field(1.0, gt=0)
    threshold: float = Field(0.7, ge=0.0, le=1.0)
    min_gold: int = Field(5, ge=1)


class Pay(BaseModel):
    currency: str = "USD"
    per_judgment: float = Field(0.04, ge=0)


class JobDefinition(BaseModel):
    name: str
    version: str
    title: str
    purpose: str
    question: str
    answers: list[Option]
    confidence: list[Option]
    cant_tell_reasons: list[str]
    redundancy: Redundancy = Redundancy()
    gold: Gold = Gold()
    trust: Trust = Trust()
    pay: Pay = Pay()

    def model_post_init(self, _context: object) -> None:
        if tuple(a.value for a in self.answers) != ANSWERS:
            raise ValueError(f"answers must be {ANSWERS}")
        if tuple(c.value for c in self.confidence) != CONFIDENCES:
            raise ValueError(f"confidence must be {CONFIDENCES}")
        if self.redundancy.max_judgments < self.redundancy.judgments_per_image:
            raise ValueError("max_judgments must be >= judgments_per_image")

    @property
    def quiz_pool(self) -> int:
        """Quiz items imported: one disjoint set per allowed attempt."""
        return self.gold.quiz_length * self.gold.quiz_attempts

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def load_job(path: Path | str = DEFAULT_JOB_FILE) -> JobDefinition:
    with open(path, encoding="utf-8") as fh:
        return JobDefinition.model_validate(yaml.safe_load(fh))
