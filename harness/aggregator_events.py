"""Events as the services publish them, for tests and benchmarks: builders of image.received,
image.rejected, prediction.made and judgment.submitted (fixed UIDs, a fake sha256), their message ids
and routing keys, publishing them, applying them straight through an aggregator's store, and a fixed
test policy (so results do not depend on the committed, calibrated policy file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.aggregator.fusion import FusionWeights
from services.aggregator.policy import Policy, Thresholds
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from services.core.contracts import (
    Answer,
    Confidence,
    ImageReceived,
    ImageRef,
    ImageRejected,
    Judgment,
    Prediction,
)

# Fixed numbers so that tests do not depend on the committed (calibrated) policy file.
TEST_POLICY = Policy(FusionWeights(), Thresholds(urgent=0.9, suspected=0.7, rule_out=0.2))


def write_test_policy(path: Path, policy: Policy = TEST_POLICY) -> Path:
    policy.save(path)
    return path


def ref(sop: str, study: str = "1.2.826.0.1.99.1", storage_uri: str = "") -> ImageRef:
    return ImageRef(
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        storage_uri=storage_uri,
        sha256="ab" * 32,
    )


def received(sop: str, study: str = "1.2.826.0.1.99.1", eligible: bool = True, **kw: Any) -> ImageReceived:
    msg = ImageReceived(
        image=ref(sop, study, kw.pop("storage_uri", "")),
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA",
        patient_age_years=4,
        triage_eligible=eligible,
        not_triaged_reason="" if eligible else "view position LL is not triaged",
        **kw,
    )
    msg.received_at.GetCurrentTime()
    return msg


def rejected(sop: str, study: str = "1.2.826.0.1.99.1") -> ImageRejected:
    msg = ImageRejected(image=ref(sop, study), reason_code="wrong_modality", reason="modality CT is not triaged")
    msg.received_at.GetCurrentTime()
    return msg


def prediction(sop: str, p: float, version: str = "1", study: str = "1.2.826.0.1.99.1", **kw: Any) -> Prediction:
    msg = Prediction(
        image=ref(sop, study), probability=p, model_name="pneumonia", model_version=version, runtime="onnxruntime", **kw
    )
    msg.predicted_at.GetCurrentTime()
    return msg


def judgment(
    sop: str, jid: str, pneumonia: bool, trust: float = 0.9, sure: bool = True, study: str = "1.2.826.0.1.99.1"
) -> Judgment:
    msg = Judgment(
        image=ref(sop, study),
        judgment_id=jid,
        annotator_id=f"ann-{jid}",
        answer=Answer.ANSWER_PNEUMONIA if pneumonia else Answer.ANSWER_HEALTHY,
        confidence=Confidence.CONFIDENCE_SURE if sure else Confidence.CONFIDENCE_PROBABLY,
        annotator_trust=trust,
    )
    msg.submitted_at.GetCurrentTime()
    return msg


ROUTING = {
    ImageReceived: "image.received",
    ImageRejected: "image.rejected",
    Prediction: "prediction.made",
    Judgment: "judgment.submitted",
}


def message_id(msg: Any) -> str:
    sop = msg.image.sop_instance_uid
    if isinstance(msg, Prediction):
        return f"inference:{sop}:{msg.model_version}"
    if isinstance(msg, Judgment):
        return f"labeling:{sop}:{msg.judgment_id}"
    return f"ingest:{sop}"


async def publish(broker: Broker, msg: Any) -> None:
    await broker.publish(ROUTING[type(msg)], msg, message_id=message_id(msg), correlation_id=msg.image.sop_instance_uid)


async def apply_events(agg: Aggregator, *messages: Any) -> None:
    """Apply events straight through the store (for tests that are not about the broker)."""
    for msg in messages:
        async with agg.lock_for(msg.image.study_instance_uid), agg.sessions() as s:
            change = await agg.store.apply(s, msg, trigger=message_id(msg))
            await s.commit()
        agg.after_commit(change)
