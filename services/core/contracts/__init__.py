"""Generated protobuf contracts (from proto/pneumotriage/v1) and their routing keys.

Regenerate with `pneumotriage contracts generate`; tests/unit/test_contracts.py fails when the
checked-in code is stale.
"""

from services.core.contracts.pneumotriage.v1.events_pb2 import (
    Answer,
    Confidence,
    Flag,
    ImageReceived,
    ImageRef,
    ImageRejected,
    Judgment,
    LabelAggregate,
    Prediction,
    RescoreRequested,
    TriageUpdated,
)

SCHEMA_VERSION = "1"

# routing key -> message class: the one table that says what travels under which key.
MESSAGE_BY_ROUTING_KEY = {
    "image.received": ImageReceived,
    "image.rejected": ImageRejected,
    "prediction.made": Prediction,
    "judgment.submitted": Judgment,
    "label.aggregated": LabelAggregate,
    "triage.updated": TriageUpdated,
    "rescore.requested": RescoreRequested,
}
ROUTING_KEY_BY_MESSAGE = {cls.DESCRIPTOR.full_name: key for key, cls in MESSAGE_BY_ROUTING_KEY.items()}

__all__ = [
    "MESSAGE_BY_ROUTING_KEY",
    "ROUTING_KEY_BY_MESSAGE",
    "SCHEMA_VERSION",
    "Answer",
    "Confidence",
    "Flag",
    "ImageReceived",
    "ImageRef",
    "ImageRejected",
    "Judgment",
    "LabelAggregate",
    "Prediction",
    "RescoreRequested",
    "TriageUpdated",
]
