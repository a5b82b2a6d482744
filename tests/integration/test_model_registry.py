"""Issue 27's registry: `model list` / `model status` say which version is active, its figures, quality
gate, drift reference and lineage, and the deploys; the inference service exports the version that
answered as pt_inference_model_info, and `model status --inference-url` compares it with the pin."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, start_http_server
from typer.testing import CliRunner

from services.cli import app
from services.core.net import free_port
from services.inference.runtime import ModelRepository, OnnxRuntime
from services.inference.worker import Pipeline
from tests.support.committed_model import (
    active_committed_version,
    committed_version_dir,
    committed_versions,
    copy_committed_model,
)
from tests.support.inference_service import image_received, shared_dicoms, uid_for

ENV = {"COLUMNS": "200"}


def run(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


@pytest.fixture(scope="module")
def reference_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir()
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:30]:
            (root / cls / src.name).symlink_to(src)
    return root


async def predict_one(repository: Path, dicom: Path):
    runtime = OnnxRuntime(ModelRepository(repository, "pneumonia"), threads=1)
    await runtime.start()
    pipeline = Pipeline(runtime, max_batch=2)
    pipeline.start()
    try:
        return await pipeline.predict(image_received(dicom, uid_for(1)))
    finally:
        await pipeline.close()
        await runtime.close()


def test_list_status_and_the_served_version(tmp_path: Path, reference_data: Path, shared_data: Path) -> None:
    committed, active = committed_versions(), active_committed_version()
    active_s, new = str(active), active + 1  # the deploy below adds the next number
    assert committed[-1] == active, "the committed config.pbtxt serves its newest version"
    live = tmp_path / "live"
    copy_committed_model(live / "pneumonia")  # every version: `model list` lists them all
    repo = ["--repository", str(live)]

    # the inference pipeline answers with the active version and says so on /metrics
    prediction = asyncio.run(predict_one(live, shared_dicoms(shared_data)[0]))
    assert prediction.model_version == active_s
    labels = {"model": "pneumonia", "version": active_s, "runtime": "onnxruntime"}
    assert REGISTRY.get_sample_value("pt_inference_model_info", labels) == 1
    port = free_port()
    start_http_server(port, addr="127.0.0.1")  # this process's registry, as the service's /metrics serves it

    result = run("model", "status", *repo, "--inference-url", f"http://127.0.0.1:{port}", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["active"] == active and status["pinned"] == [] and not status["problems"]
    assert status["inference_serves"] == [labels]
    assert status["version"]["test"]["auc"] > 0.98 and status["version"]["drift_reference"]["n"] > 500

    # a deploy of the next version (a copy of the active one: it passes the gate): list and status follow it
    staged = shutil.copytree(committed_version_dir(active), tmp_path / "staged")
    gate = ["--reference-data", str(reference_data), "--reference-split", "all"]
    assert run("model", "deploy", *repo, "--model-dir", str(staged), *gate).exit_code == 0
    listing = json.loads(run("model", "list", *repo, "--json").output)
    assert [(v["version"], v["active"]) for v in listing["versions"]] == [
        *((v, False) for v in committed),
        (new, True),
    ]
    added = listing["versions"][-1]
    assert added["quality_gate"]["passed"] and added["quality_gate"]["against"] == active_s
    assert added["drift_reference"]["n"] == 60 and added["deployed_from"] == str(staged.resolve())
    table = run("model", "list", *repo)
    assert table.exit_code == 0 and "passed" in table.output

    # the running service still answers with the old version: status says so and exits 1
    result = run("model", "status", *repo, "--inference-url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1, result.output
    assert f"active version: {new}" in result.output
    assert f"serves ['{active}'] but version {new} is active" in result.output
    assert "quality gate: passed" in result.output and f"deploy v{new} (was {active}) ok" in result.output
