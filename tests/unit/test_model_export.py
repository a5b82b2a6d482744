"""Model-repository bookkeeping of the exporter: version numbers and config.pbtxt."""

from __future__ import annotations

from pathlib import Path

from services.inference.tools.training.export import next_version, write_config


def test_next_version_counts_numeric_dirs_only(tmp_path: Path) -> None:
    assert next_version(tmp_path / "missing") == 1
    for name in ("1", "3", "notes", "2x"):
        (tmp_path / name).mkdir()
    assert next_version(tmp_path) == 4


def test_config_describes_the_shapes_and_keeps_a_deployed_pin(tmp_path: Path) -> None:
    path = write_config(tmp_path, input_size=160, cam_size=10)
    text = path.read_text()
    assert "dims: [ 1, 160, 160 ]" in text and "dims: [ 10, 10 ]" in text
    assert "version_policy: { latest: { num_versions: 1 } }" in text
    path.write_text(text.replace("latest: { num_versions: 1 }", "specific: { versions: [ 2 ] }"))
    text = write_config(tmp_path, input_size=192, cam_size=12).read_text()
    assert "dims: [ 1, 192, 192 ]" in text
    assert "version_policy: { specific: { versions: [ 2 ] } }" in text
