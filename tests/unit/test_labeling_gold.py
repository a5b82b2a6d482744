"""Gold selection, rendering and the simulated crowd's eyes, on the shared data."""

from __future__ import annotations

from pathlib import Path

from services.labeling.gold import choose_gold, patient_of, pattern_of
from services.labeling.render import render_source
from services.labeling.tools.crowd import PROFILES, TruthIndex, parse_spec
from tests.support.labeling_service import PHI_MARKERS, marked_dicom


def test_patient_ids_from_file_names() -> None:
    assert patient_of("person1134_bacteria_3076.jpeg") == "1134"
    assert patient_of("IM-0272-0001.jpeg") == "IM-0272"
    assert patient_of("NORMAL2-IM-0465-0001.jpeg") == "NORMAL2-IM-0465"
    assert pattern_of("pneumonia", "person369_virus_750.jpeg") == "virus"
    assert pattern_of("healthy", "IM-0272-0001.jpeg") == "normal"


def test_gold_is_balanced_one_per_patient_and_deterministic(shared_data: Path) -> None:
    train = shared_data / "kermany224" / "train"
    gold = choose_gold(train, 20, seed=7)
    assert gold == choose_gold(train, 20, seed=7)
    assert sum(1 for _, label in gold if label == "healthy") == 10
    assert sum(1 for _, label in gold if label == "pneumonia") == 10
    assert len({patient_of(p.name) for p, _ in gold}) == 20
    patterns = {pattern_of(label, p.name) for p, label in gold}
    assert patterns == {"normal", "bacteria", "virus"}
    assert all(p.parent.name == ("NORMAL" if label == "healthy" else "PNEUMONIA") for p, label in gold)


def test_rendered_png_carries_pixels_only(shared_data: Path, tmp_path: Path) -> None:
    src = next((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))
    dcm = tmp_path / "x.dcm"
    marked_dicom(src, dcm, 1)
    assert b"PHIMARK" in dcm.read_bytes()
    png = render_source(dcm, 512)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for marker in PHI_MARKERS:
        assert marker.encode() not in png
    for shared in (shared_data / "dicom").glob("*.dcm"):  # the shared DICOMs: JPEG baseline, PHI markers
        out = render_source(shared, 256)
        assert b"Sample^Patient" not in out and b"KERMANY-" not in out


def test_simulated_crowd_sees_the_right_class(shared_data: Path, tmp_path: Path) -> None:
    """The crowd knows the truth only by matching the served image: that match must be right."""
    train = shared_data / "kermany224" / "train"
    picked = choose_gold(train, 12, seed=99)
    root = tmp_path / "truth"
    for path, label in picked:
        folder = root / ("PNEUMONIA" if label == "pneumonia" else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).symlink_to(path)
    index = TruthIndex([root])
    for i, (path, label) in enumerate(picked):  # served as a DICOM rendering, not the original file
        dcm = tmp_path / f"{i}.dcm"
        marked_dicom(path, dcm, i)
        assert index.label_of(render_source(dcm, 1024)) == label
    assert parse_spec("expert:2,spammer") == ["expert", "expert", "spammer"]
    assert {"expert", "careless", "adversarial", "spammer", "typical", "biased"} <= set(PROFILES)
