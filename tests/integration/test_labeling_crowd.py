"""A simulated crowd (experts, careless, adversarial, spammer) against the real service, on real
images with known labels that arrived as image.received events: trust separates the annotators,
Dawid-Skene beats majority vote, dynamic judgments spend extra votes on disputed images, and the
exports carry what ML engineers and a crowd vendor need."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.rabbitmq import RabbitNode
from services.labeling.gold import choose_gold
from tests.support.labeling_service import OWNER, PHI_MARKERS, LabelingServer, work_sources

N_IMAGES = 30
CROWD = "expert:4,careless:2,adversarial:2,spammer:1"


@pytest.fixture(scope="module")
def crowd_run(rabbit: RabbitNode, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    train = shared_data / "kermany224" / "train"
    server = LabelingServer(rabbit.url, train, n_gold=28, hidden_ratio=0.3).start()
    try:
        sources = work_sources(shared_data, N_IMAGES, offset=200)
        uids = server.add_work_images([p for p, _ in sources])
        server.wait_for("SELECT count(*) FROM labeling_tasks WHERE kind='work'", lambda r: r[0][0] >= N_IMAGES, 120)
        truth_dir = tmp_path_factory.mktemp("truth")
        for path, label in [*sources, *choose_gold(train, 28)]:
            folder = truth_dir / ("PNEUMONIA" if label == "pneumonia" else "NORMAL")
            folder.mkdir(exist_ok=True)
            if not (folder / path.name).exists():  # a work image may also be a gold image
                (folder / path.name).symlink_to(path)
        out = tmp_path_factory.mktemp("export")
        server.cli(
            "simulate-crowd",
            "--url",
            server.url,
            "--annotators",
            CROWD,
            "--truth",
            str(truth_dir),
            "--owner",
            OWNER[0],
            "--owner-password",
            OWNER[1],
            "--seed",
            "3",
            "--json-out",
            str(out / "crowd.json"),
        )
        result = json.loads((out / "crowd.json").read_text())
        server.cli("export", "--out", str(out / "dataset"))
        server.cli("export-job", "--format", "appen", "--out", str(out / "appen"))
        result["_export"] = out
        result["_uids"] = uids
        result["_server_log"] = server.log()
        yield result
    finally:
        server.stop()


def test_trust_separates_annotators(crowd_run: dict) -> None:
    a = crowd_run["annotators"]
    print(json.dumps({k: v for k, v in crowd_run.items() if not k.startswith("_")}, indent=1, default=str))
    assert all(r["quiz_passed"] for r in a["expert"])
    assert all(r["status"] == "stopped" for r in a["adversarial"]), a["adversarial"]
    min_expert = min(r["trust"] for r in a["expert"])
    assert all(r["trust"] < min_expert for r in a["adversarial"])
    mean_expert = sum(r["trust"] for r in a["expert"]) / len(a["expert"])
    assert all(r["trust"] < mean_expert for r in a["spammer"])


def test_dawid_skene_beats_majority_vote(crowd_run: dict) -> None:
    assert crowd_run["images"] + crowd_run["images_open"] == N_IMAGES
    assert crowd_run["images"] >= 0.8 * N_IMAGES  # complete images (a few may lack enough trusted annotators)
    assert crowd_run["accuracy_service_em"] >= crowd_run["accuracy_majority_vote_all"]
    assert crowd_run["accuracy_service_em"] >= 0.9
    assert crowd_run["cost_per_final_label"] > 0


def test_dynamic_judgments_spend_votes_on_disputed_images(crowd_run: dict) -> None:
    agreed, disputed = crowd_run["mean_judgments_first3_agreed"], crowd_run["mean_judgments_first3_disputed"]
    assert agreed is not None and disputed is not None
    assert disputed > agreed


def test_exports(crowd_run: dict) -> None:
    out: Path = crowd_run["_export"]
    labels = list(csv.DictReader(open(out / "dataset" / "labels.csv")))
    assert {r["sop_instance_uid"] for r in labels} == set(crowd_run["_uids"])
    assert {r["final_label"] for r in labels} <= {"pneumonia", "healthy", "cant_tell", ""}
    # every posterior says where it comes from (here: annotators only, the service uses no model prior)
    assert {r["posterior_source"] for r in labels if r["method"]} == {"crowd"}
    assert all(r["posterior_source"] == "" for r in labels if not r["method"])
    # training can read the export: ids -> stored images, with the posterior
    from services.inference.tools.training.from_export import records_from_export

    usable = [r for r in labels if r["complete"] == "True" and r["final_label"] in ("pneumonia", "healthy")]
    records = records_from_export(out / "dataset")
    assert usable and len(records) == len(usable)
    assert all(r.record.path.is_file() and r.record.path.suffix == ".dcm" for r in records)
    by_path = {r.record.path.as_uri(): r for r in records}
    for row in usable:
        rec = by_path[row["storage_uri"]]
        assert rec.record.label == (row["final_label"] == "pneumonia") and rec.p_pneumonia == float(row["p_pneumonia"])
    records = [json.loads(line) for line in open(out / "dataset" / "labels.jsonl")]
    work = [r for r in records if not r["is_gold"]]
    assert all(j["annotator_id"].startswith("ann-") for r in work for j in r["all_judgments"])
    assert any(r["is_gold"] for r in records)
    report = json.loads((out / "dataset" / "job-report.json").read_text())
    assert report["cost_per_final_label"] and report["fleiss_kappa"] is not None
    assert report["krippendorff_alpha"] is not None
    appen = out / "appen"
    assert "<cml:radios" in (appen / "job.cml").read_text()
    data = list(csv.DictReader(open(appen / "data.csv")))
    gold = list(csv.DictReader(open(appen / "test_questions.csv")))
    assert len(data) == N_IMAGES and all((appen / r["image_url"]).exists() for r in data)
    assert gold and all(r["answer_gold"] in ("pneumonia", "healthy") and r["answer_gold_reason"] for r in gold)
    vendor_text = "".join(p.read_text() for p in appen.glob("*.*"))
    for marker in (*PHI_MARKERS, "1.2.826"):  # nothing identifying goes to a vendor, not even UIDs
        assert marker not in vendor_text
