"""kill -9 of the labeling service right after annotators' answers were acknowledged: after a restart
every acknowledged answer is there, becomes final and reaches the broker exactly under its message id."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.queues import take_sync
from harness.rabbitmq import RabbitNode
from services.core.broker import PermanentError, decode
from tests.support.labeling_service import (  # noqa: F401
    ANNOTATOR,
    Api,
    LabelingServer,
    gold_answers,
    labeling_server_fixture,
    work_sources,
)


def judgment_ids_on_broker(url: str) -> list[str]:
    got: list[str] = []
    for msg in take_sync(url, "aggregator.events"):
        try:
            env = decode(msg)
        except PermanentError:  # something another test left on the shared node: not ours
            continue
        if env.routing_key == "judgment.submitted":
            got.append(env.payload.judgment_id)
    return got


@pytest.mark.slow  # ~40 s: keeps the default run short
def test_kill9_loses_no_acknowledged_answer(
    labeling_server: LabelingServer, shared_data: Path, rabbit: RabbitNode
) -> None:
    server = labeling_server
    server.add_work_images([p for p, _ in work_sources(shared_data, 4, offset=600)])
    server.wait_for("SELECT count(*) FROM labeling_tasks WHERE kind='work'", lambda r: r[0][0] >= 4, 90)
    gold = gold_answers(server)
    kinds = dict(server.query("SELECT id, kind FROM labeling_tasks"))
    ann = Api(server.url, *ANNOTATOR)
    assert ann.post("/api/instructions").status_code == 200
    acked: list[str] = []
    while len(acked) < 4:
        nxt = ann.get("/api/next").json()
        assert nxt["state"] in ("quiz", "work"), nxt
        answer = gold.get(nxt["task_id"], "healthy")
        res = ann.post("/api/judgments", json={"task_id": nxt["task_id"], "answer": answer, "confidence": "sure"})
        assert res.status_code == 200, res.text
        if nxt["state"] == "work" and kinds[nxt["task_id"]] == "work":
            acked.append(res.json()["judgment_id"])
    server.kill9()  # the last answer is still pending (undo window), its event not yet staged
    stored = {r[0]: r[1] for r in server.query("SELECT id, state FROM labeling_judgments WHERE context='work'")}
    assert set(acked) <= set(stored)
    assert "pending" in stored.values()
    server.launch()
    server.wait_for("SELECT count(*) FROM labeling_judgments WHERE state='pending'", lambda r: r[0][0] == 0, 60)
    server.wait_for("SELECT count(*) FROM labeling_outbox WHERE published_at IS NULL", lambda r: r[0][0] == 0, 60)
    published = judgment_ids_on_broker(rabbit.url)
    assert set(acked) <= set(published)
    rows = server.query(
        "SELECT count(*), count(DISTINCT message_id) FROM labeling_outbox WHERE routing_key='judgment.submitted'"
    )
    assert rows[0][0] == rows[0][1] == len(acked)  # one event per final answer, no more
