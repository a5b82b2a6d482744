"""`pneumotriage model gate-fit` (issue 27): by default it never overwrites the committed input gate
(services/core/gate_model.json, which inference and labeling load) and never re-uses its version
string; a new gate goes to <PT_DATA_DIR>/gate-staging under a new version (gate-<N+1>), with the
committed gate's architecture (32 hidden units), and an existing file is replaced only with
--overwrite. Before, the defaults wrote a logistic regression over the committed 32-unit gate under
the same version "gate-1". Real images (a 16-chest corpus, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from services.cli import app
from services.core.gate import DEFAULT_GATE_FILE


def test_gate_fit_stages_a_new_version_and_never_overwrites_the_committed_gate(
    shared_data: Path, tmp_path: Path
) -> None:
    committed = DEFAULT_GATE_FILE.read_bytes()
    env = {"PT_DATA_DIR": str(tmp_path / "var"), "COLUMNS": "200"}
    data = shared_data / "kermany224" / "train"
    runner = CliRunner()
    try:
        first = runner.invoke(app, ["model", "gate-fit", "--data", str(data), "--limit", "16"], env=env)
        assert first.exit_code == 0, first.output
        assert DEFAULT_GATE_FILE.read_bytes() == committed
        staged = tmp_path / "var" / "gate-staging" / "gate_model-gate-2.json"
        gate = json.loads(staged.read_text())
        assert gate["version"] == "gate-2" and len(gate["hidden"][0]["b"]) == 32, gate["meta"]
        assert "gate-evaluate --gate" in first.output

        second = runner.invoke(app, ["model", "gate-fit", "--data", str(data), "--limit", "16"], env=env)
        assert second.exit_code == 0, second.output
        assert json.loads((staged.parent / "gate_model-gate-3.json").read_text())["version"] == "gate-3"

        into_committed = runner.invoke(
            app, ["model", "gate-fit", "--data", str(data), "--limit", "16", "--out", str(DEFAULT_GATE_FILE)], env=env
        )
        assert into_committed.exit_code == 2 and "exists" in into_committed.output, into_committed.output
        same_version = runner.invoke(
            app, ["model", "gate-fit", "--version", "gate-1", "--out", str(tmp_path / "g.json")], env=env
        )
        assert same_version.exit_code == 2 and "new version string" in same_version.output, same_version.output
        assert not (tmp_path / "g.json").exists()
        assert DEFAULT_GATE_FILE.read_bytes() == committed
    finally:
        if DEFAULT_GATE_FILE.read_bytes() != committed:  # the old behaviour: put the committed gate back
            DEFAULT_GATE_FILE.write_bytes(committed)
