"""Issue 29: annotators are paid only for images the model may judge. The input gate's refusal cases
(10 x 10, 10 x 45, 10 x 50, 64 x 64, a 1024 x 256 strip, a field of view of 1.2 m, a blank image,
noise, an inverted chest, pydicom's CT / MR / NM / US images under a DX / CHEST / PA header), two
borderline chests and real chest X-rays go as image.received events through the real inference
service (embedded onnxruntime) and the real labeling service (its own process) on one RabbitMQ node.

Every image inference refuses becomes no labeling task: the labeling service lists it with the same
reason (owner page, owner API, /metrics) and no export holds it; every chest X-ray becomes a task; a
borderline image becomes a task marked borderline in the export; the gold set is untouched."""

from __future__ import annotations

import csv
import hashlib
import html
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from harness.rabbitmq import RabbitNode
from harness.wait import eventually
from services.core.broker import Broker
from tests.support.gate_corpus import borderline_corpus, chest_corpus, non_chest_corpus, refusal_corpus
from tests.support.inference_service import (
    collect_predictions,
    image_received,
    publish_events,
    running_service,
    service_settings,
)
from tests.support.labeling_service import OWNER, Api, LabelingServer, labeling_server_fixture  # noqa: F401
from tests.support.metrics import counter_total
from tests.support.triton import inference_repository_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(600)


async def test_images_the_gate_refuses_become_no_crowd_work(
    labeling_server: LabelingServer,
    broker: Broker,
    rabbit: RabbitNode,
    shared_data: Path,
    tmp_path: Path,
    inference_repository: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    corpora = {
        "refuse": refusal_corpus(shared_data),
        "non_chest": non_chest_corpus(shared_data),
        "borderline": borderline_corpus(shared_data),
        "chest": chest_corpus(shared_data),
    }
    events, names, kinds = [], {}, {}
    for kind, corpus in corpora.items():
        for name, raw in corpus:
            path = store / f"{len(events):03d}.dcm"
            path.write_bytes(raw)
            uid = f"1.2.826.0.1.3680043.8.498.29.{len(events)}"
            event = image_received(path, uid, sha256=hashlib.sha256(raw).hexdigest())
            event.image.study_instance_uid = f"{uid}.9"
            events.append(event)
            names[uid], kinds[uid] = name, kind
    gold_before = labeling_server.query("SELECT kind, count(*) FROM labeling_tasks WHERE kind != 'work' GROUP BY kind")

    # one publish: inference and labeling each get every image.received (their own queues)
    settings = service_settings(rabbit.url, tmp_path, inference_repository, max_batch=8)
    async with running_service(settings):
        await publish_events(broker, events)
        predictions = await collect_predictions(broker, len(events), timeout=240)
    verdicts = {p.image.sop_instance_uid: (p.gate_verdict, p.gate_reason) for p, _ in predictions}
    assert set(verdicts) == set(names)
    refused = {uid for uid, (v, _) in verdicts.items() if v == "refuse"}
    borderline = {uid for uid, (v, _) in verdicts.items() if v == "borderline"}
    # the cases of the issue are refused by inference, no chest is, the borderline chests are marked
    assert {uid for uid, k in kinds.items() if k in ("refuse", "non_chest")} <= refused, [
        (names[u], verdicts[u]) for u, k in kinds.items() if k in ("refuse", "non_chest") and u not in refused
    ]
    assert not refused & {uid for uid, k in kinds.items() if k in ("chest", "borderline")}
    assert {uid for uid, k in kinds.items() if k == "borderline"} <= borderline

    # the labeling service has handled every event (its outcomes add up), then: exactly these outcomes
    def all_handled() -> str | None:
        metrics = httpx.get(labeling_server.url + "/metrics").text
        return metrics if counter_total(metrics, "pt_labeling_tasks_created") >= len(events) else None

    metrics = eventually(all_handled, 180, 0.3, what=lambda: "all events handled by labeling\n" + labeling_server.log())
    tasks = {
        uid: (verdict, reason)
        for uid, verdict, reason in labeling_server.query(
            "SELECT sop_instance_uid, gate_verdict, gate_reason FROM labeling_tasks WHERE kind='work'"
        )
    }
    skipped = {
        uid: (check, reason)
        for uid, check, reason in labeling_server.query(
            "SELECT sop_instance_uid, gate_check, reason FROM labeling_skipped_images"
        )
    }
    made_of_refused = [(names[u], verdicts[u][1]) for u in refused & set(tasks)]
    assert not made_of_refused, f"crowd tasks made of images the gate refuses: {made_of_refused}"
    assert set(tasks) == set(names) - refused  # every chest X-ray (and borderline image) is a task
    assert set(skipped) == refused
    for uid, (_check, reason) in skipped.items():
        assert reason == verdicts[uid][1], names[uid]  # the same rules and the same reason as inference
    for uid, (verdict, _reason) in tasks.items():
        assert verdict == (verdicts[uid][0] or "ok"), names[uid]
    by_check = Counter(check for check, _ in skipped.values())
    assert {"size", "aspect", "field_of_view", "blank", "score"} <= set(by_check)
    assert counter_total(metrics, "pt_labeling_tasks_created", outcome="created") == len(tasks)
    assert counter_total(metrics, "pt_labeling_tasks_created", outcome="skipped_gate") == len(refused)
    assert counter_total(metrics, "pt_labeling_images_skipped") == len(refused)
    for check, n in by_check.items():
        assert counter_total(metrics, "pt_labeling_images_skipped", reason=check) == n, check
    assert counter_total(metrics, "pt_labeling_borderline_tasks") == len(borderline)
    # gold and quiz images are not the gate's business: the same set as before
    after = labeling_server.query("SELECT kind, count(*) FROM labeling_tasks WHERE kind != 'work' GROUP BY kind")
    assert after == gold_before and sum(n for _, n in after) == labeling_server.n_gold

    # the owner page: the skipped count and every reason; the owner API: the same list
    owner = Api(labeling_server.url, *OWNER)
    page = owner.get("/owner", headers={"accept": "text/html"}).text
    assert f'<dd id="skipped">{len(refused)}</dd>' in page
    assert f'<dd id="borderline">{len(borderline)}</dd>' in page
    for check, n in by_check.items():
        assert f"<tr><td>{check}</td><td>{n}</td></tr>" in page
    for uid in refused:
        assert html.escape(verdicts[uid][1]) in page, names[uid]
    api = owner.get("/api/owner/skipped").json()
    assert api["total"] == len(refused) and api["by_check"] == dict(by_check)
    assert {k["sop_instance_uid"] for k in api["images"]} == refused
    summary = owner.get("/api/owner/summary").json()
    assert summary["images"] == len(tasks) and summary["skipped_by_gate"] == len(refused)

    # the export: every task, none of the refused images, the borderline ones marked
    out = tmp_path / "export"
    labeling_server.cli("export", "--out", str(out))
    rows = list(csv.DictReader((out / "labels.csv").read_text().splitlines()))
    assert {r["sop_instance_uid"] for r in rows} == set(tasks)
    for r in rows:
        uid = r["sop_instance_uid"]
        assert r["input_gate"] == ("borderline" if uid in borderline else "ok"), names[uid]
        assert (r["input_gate_reason"] != "") == (uid in borderline)
    records = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert {r["sop_instance_uid"] for r in records if not r["is_gold"]} == set(tasks)
    report_text = (out / "job-report.json").read_text()
    report = json.loads(report_text)
    assert report["skipped_by_gate"] == len(refused) and report["images"] == len(tasks)
    assert not [names[u] for u in refused if f'"{u}"' in report_text]  # counted, not listed
