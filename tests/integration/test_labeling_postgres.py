"""The labeling service on PostgreSQL (PT_DATABASE_URL): quiz, judging, undo, aggregation, owner
figures and export run on the same code as SQLite."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.rabbitmq import RabbitNode
from harness.wait import eventually
from tests.support.labeling_service import ANNOTATOR, OWNER, Api, LabelingServer, work_sources
from tests.support.postgres import PostgresCluster, postgres  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # ~45 s: keeps the default run short


@pytest.fixture(scope="module")
def pg_server(rabbit: RabbitNode, postgres: PostgresCluster, shared_data: Path) -> Iterator[LabelingServer]:  # noqa: F811
    server = LabelingServer(rabbit.url, shared_data / "kermany224" / "train", database_url=postgres.url).start()
    try:
        yield server
    finally:
        server.stop()


def test_labeling_on_postgres(pg_server: LabelingServer, shared_data: Path, tmp_path: Path) -> None:
    server = pg_server
    server.add_work_images([p for p, _ in work_sources(shared_data, 3, offset=700)])
    owner = Api(server.url, *OWNER)
    eventually(lambda: len(owner.get("/api/owner/labels").json()["tasks"]) >= 3, 90, 0.5,
               what=lambda: f"3 work tasks:\n{server.log()}")  # fmt: skip
    ann = Api(server.url, *ANNOTATOR)
    assert ann.post("/api/instructions").status_code == 200
    # quiz attempt 1: always "pneumonia" (fails: the quiz is balanced); the retake asks other images,
    # answered right from the owner's gold answers (the Appen export's test questions)
    server.cli("export-job", "--format", "appen", "--out", str(tmp_path / "appen"))
    with open(tmp_path / "appen" / "test_questions.csv", newline="") as fh:
        gold = {r["task_id"]: r["answer_gold"] for r in csv.DictReader(fh)}
    asked: list[list[str]] = [[], []]
    attempt = 0
    while (nxt := ann.get("/api/next").json())["state"] == "quiz":
        asked[attempt].append(nxt["task_id"])
        answer = "pneumonia" if attempt == 0 else gold[nxt["task_id"]]
        out = ann.post("/api/judgments", json={"task_id": nxt["task_id"], "answer": answer, "confidence": "sure"})
        assert out.status_code == 200, out.text
        if out.json().get("quiz_finished"):
            assert out.json()["quiz_passed"] == (out.json()["quiz_score"] >= 0.75) == (attempt == 1)
            attempt += 1
    assert len(asked[0]) == len(asked[1]) == 8 and not set(asked[0]) & set(asked[1])
    assert nxt["state"] == "work"
    work_ids = {t["task_id"] for t in owner.get("/api/owner/labels").json()["tasks"]}
    paid = 0
    while nxt["task_id"] not in work_ids:  # a hidden test question first: answer it, it is paid work too
        out = ann.post("/api/judgments", json={"task_id": nxt["task_id"], "answer": "healthy", "confidence": "sure"})
        assert out.status_code == 200
        paid += 1
        nxt = ann.get("/api/next").json()
    first = nxt["task_id"]
    body = {"task_id": first, "answer": "pneumonia", "confidence": "sure"}
    assert ann.post("/api/judgments", json=body).status_code == 200
    assert ann.post("/api/judgments", json=body).status_code == 409
    assert ann.post("/api/undo").json()["task_id"] == first
    assert ann.post("/api/judgments", json={**body, "answer": "healthy"}).status_code == 200
    for _ in range(2):
        nxt = ann.get("/api/next").json()
        assert ann.post("/api/judgments", json={**body, "task_id": nxt["task_id"]}).status_code == 200

    def settled_labels() -> dict | None:
        labels = owner.get("/api/owner/labels").json()
        return None if labels["pending"] else labels

    labels = eventually(settled_labels, 60, 0.5, what=lambda: f"no pending answer:\n{server.log()}")
    by_id = {t["task_id"]: t for t in labels["tasks"]}
    assert [j["answer"] for j in by_id[first]["all_judgments"]] == ["healthy"]
    assert by_id[first]["final_label"] == "healthy" and by_id[first]["revision"] >= 1
    summary = owner.get("/api/owner/summary").json()
    paid += 3
    assert summary["judgments_paid"] == paid and summary["cost_so_far"] == pytest.approx(0.04 * paid)
    server.cli("export", "--out", str(tmp_path / "out"))
    rows = list(csv.DictReader(open(tmp_path / "out" / "labels.csv")))
    assert len(rows) == 3 and {r["task_id"] for r in rows} == set(by_id)
