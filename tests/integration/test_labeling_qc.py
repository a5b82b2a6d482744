"""Quality control cannot be gamed (real service, real broker): a quiz retake asks other images and
retakes are capped; an answer's response never tells a hidden test question from a work image, the
result of a test question is revealed only gold.feedback_delay answers later."""

from __future__ import annotations

from pathlib import Path

from tests.support.labeling_service import (  # noqa: F401
    Api,
    LabelingServer,
    gold_answers,
    labeling_server_fixture,
    work_sources,
)

WRONG = {"pneumonia": "healthy", "healthy": "pneumonia"}
DELAY = 3  # gold.feedback_delay of the test job


def new_annotator(server: LabelingServer, name: str) -> Api:
    server.cli("add-user", name, "--role", "annotator", "--password", name + "-pass")
    api = Api(server.url, name, name + "-pass")
    assert api.post("/api/instructions").status_code == 200
    return api


def quiz_attempt(api: Api, gold: dict[str, str], right: bool) -> tuple[list[str], dict]:
    """Answer one quiz attempt (all right or all wrong); the task ids in the order asked, the last response."""
    asked: list[str] = []
    out: dict = {}
    while not out.get("quiz_finished"):
        nxt = api.get("/api/next").json()
        assert nxt["state"] == "quiz", nxt
        asked.append(nxt["task_id"])
        label = gold[nxt["task_id"]]
        res = api.post(
            "/api/judgments",
            json={"task_id": nxt["task_id"], "answer": label if right else WRONG[label], "confidence": "sure"},
        )
        assert res.status_code == 200, res.text
        out = res.json()
    return asked, out


def test_quiz_retake_asks_other_images_and_retakes_are_capped(labeling_server: LabelingServer) -> None:
    gold = gold_answers(labeling_server)
    pool = {r[0] for r in labeling_server.query("SELECT id FROM labeling_tasks WHERE kind='quiz'")}
    assert len(pool) == 16  # quiz_length 8 x quiz_attempts 2
    api = new_annotator(labeling_server, "qc-retake")
    first, out = quiz_attempt(api, gold, right=False)
    assert len(first) == 8 and out["quiz_passed"] is False and out["stopped"] is False
    second, out = quiz_attempt(api, gold, right=False)
    assert len(second) == 8
    assert not set(first) & set(second), "the retake replayed images whose answers were shown"
    assert set(first) | set(second) == pool
    assert out["quiz_passed"] is False and out["stopped"] is True
    # no third attempt: turned away, and quiz answers are refused
    assert api.get("/api/next").json()["state"] == "stopped"
    res = api.post("/api/judgments", json={"task_id": first[0], "answer": gold[first[0]], "confidence": "sure"})
    assert res.status_code == 403
    status = labeling_server.query("SELECT status FROM labeling_users WHERE name='qc-retake'")
    assert status == [("quiz_failed",)]


def test_quiz_images_of_other_attempts_are_not_served(labeling_server: LabelingServer) -> None:
    gold = gold_answers(labeling_server)
    pool = sorted(r[0] for r in labeling_server.query("SELECT id FROM labeling_tasks WHERE kind='quiz'"))
    api = new_annotator(labeling_server, "qc-peek")
    visible = {t for t in pool if api.get(f"/img/{t}.png").status_code == 200}
    assert len(visible) == 8  # only this attempt's images, not the retake's
    asked, _out = quiz_attempt(api, gold, right=False)
    assert set(asked) == visible
    nxt = api.get("/api/next").json()
    assert nxt["state"] == "quiz" and nxt["task_id"] not in asked
    # answering a quiz image that is not in this attempt is refused
    res = api.post("/api/judgments", json={"task_id": asked[0], "answer": gold[asked[0]], "confidence": "sure"})
    assert res.status_code == 409


def test_answers_do_not_tell_gold_from_work_and_results_come_later(
    labeling_server: LabelingServer, shared_data: Path
) -> None:
    labeling_server.add_work_images([p for p, _ in work_sources(shared_data, 4, offset=600)])
    labeling_server.wait_for("SELECT count(*) FROM labeling_tasks WHERE kind='work'", lambda r: r[0][0] >= 4, 90)
    gold = gold_answers(labeling_server)
    kinds = dict(labeling_server.query("SELECT id, kind FROM labeling_tasks"))
    api = new_annotator(labeling_server, "qc-gold")
    quiz_attempt(api, gold, right=True)
    responses: dict[str, list[dict]] = {"work": [], "hidden": []}
    missed: str | None = None
    answered = missed_at = 0
    while answered < 20 and (missed is None or answered - missed_at < DELAY or not responses["work"]):
        nxt = api.get("/api/next").json()
        assert nxt["state"] == "work", nxt
        task = nxt["task_id"]
        if kinds[task] == "hidden" and missed is None:
            answer, missed = WRONG[gold[task]], task  # miss the first test question, answer the others right
        else:
            answer = gold.get(task, "pneumonia")
        res = api.post("/api/judgments", json={"task_id": task, "answer": answer, "confidence": "sure"})
        assert res.status_code == 200, res.text
        responses[kinds[task]].append(res.json())
        answered += 1
        if task == missed:
            me = api.get("/api/me").json()
            assert me["gold_answered"] == 0 and me["gold_accuracy"] is None  # nothing told yet
            assert api.get("/api/feedback").json()["items"] == []
            missed_at = answered
    assert missed is not None and responses["work"] and responses["hidden"]
    keys = {frozenset(r) for rs in responses.values() for r in rs}
    assert keys == {frozenset({"judgment_id", "stopped"})}, keys  # the same shape for gold and work
    assert all(r["stopped"] is False for rs in responses.values() for r in rs)
    # revealed once DELAY further answers were given
    assert answered - missed_at >= DELAY
    fb = api.get("/api/feedback").json()
    first = fb["items"][0]
    assert first["task_id"] == missed and first["correct"] is False
    assert first["gold_label"] == gold[missed] and first["reason"]
    # only items answered at least DELAY answers ago are revealed
    assert all(item["answer_number"] <= answered - DELAY for item in fb["items"])
    me = api.get("/api/me").json()
    assert me["gold_answered"] == fb["revealed"] >= 1
    page = api.get("/feedback", headers={"accept": "text/html"}).text
    assert f"{fb['right']} of {fb['revealed']} right" in page
