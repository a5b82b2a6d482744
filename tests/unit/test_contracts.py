"""The checked-in generated code matches proto/ (regenerated with the pinned protoc) and the
contracts never carry pixels or PHI."""

from __future__ import annotations

from pathlib import Path

from services.core import contracts
from services.core.contracts.generate import OUT_DIR, generate


def test_generated_code_is_in_sync_with_proto(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        checked_in = OUT_DIR / path.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} missing: run `pneumotriage contracts generate`"
        assert checked_in.read_text() == path.read_text(), (
            f"{checked_in} is stale: run `pneumotriage contracts generate`"
        )


def test_package_is_versioned() -> None:
    for cls in contracts.MESSAGE_BY_ROUTING_KEY.values():
        assert cls.DESCRIPTOR.full_name.startswith("pneumotriage.v1.")


def test_messages_carry_no_pixels_and_no_phi_fields() -> None:
    forbidden = ("pixel", "patient_name", "patient_id", "birth", "accession")
    for cls in contracts.MESSAGE_BY_ROUTING_KEY.values():
        for field in cls.DESCRIPTOR.fields:
            assert field.type != field.TYPE_BYTES, f"{cls.__name__}.{field.name} is a bytes field"
            assert not any(f in field.name for f in forbidden), f"{cls.__name__}.{field.name}"


def test_every_image_event_identifies_the_file() -> None:
    ref = contracts.ImageRef.DESCRIPTOR.fields_by_name
    for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "storage_uri", "sha256"):
        assert name in ref
    for key in ("image.received", "image.rejected", "prediction.made", "judgment.submitted", "label.aggregated"):
        assert "image" in contracts.MESSAGE_BY_ROUTING_KEY[key].DESCRIPTOR.fields_by_name


def test_round_trip() -> None:
    msg = contracts.Prediction(
        image=contracts.ImageRef(sop_instance_uid="1.2.3", sha256="0" * 64), probability=0.73, model_version="2"
    )
    assert contracts.Prediction.FromString(msg.SerializeToString()) == msg
