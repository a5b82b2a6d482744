"""The labeling service against a real RabbitMQ node: tasks from image.received, events out through
the outbox, roles, PHI, CSRF/XSS and bad input."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from harness.queues import take_sync
from harness.rabbitmq import RabbitNode
from harness.wait import eventually
from services.core.contracts import Answer, Judgment, LabelAggregate
from tests.support.labeling_service import (  # noqa: F401
    ANNOTATOR,
    ANNOTATOR2,
    OWNER,
    PHI_MARKERS,
    Api,
    LabelingServer,
    gold_answers,
    labeling_server_fixture,
    work_sources,
)
from tests.support.metrics import counter_total

WORK_N = 6


@pytest.fixture(scope="module")
def with_images(labeling_server: LabelingServer, shared_data: Path) -> list[str]:
    sources = [p for p, _ in work_sources(shared_data, WORK_N, offset=50)]
    uids = labeling_server.add_work_images(sources, duplicate_first=True)
    labeling_server.add_work_images(sources[:2], eligible=False)  # LL views: not for triage, no task
    labeling_server.wait_for(
        "SELECT count(*) FROM labeling_tasks WHERE kind='work'", lambda rows: rows[0][0] >= WORK_N, 90
    )
    return uids


def pass_quiz(api: Api, server: LabelingServer) -> None:
    gold = gold_answers(server)
    assert api.post("/api/instructions").status_code == 200
    while (nxt := api.get("/api/next").json())["state"] == "quiz":
        res = api.post(
            "/api/judgments", json={"task_id": nxt["task_id"], "answer": gold[nxt["task_id"]], "confidence": "sure"}
        )
        assert res.status_code == 200, res.text


def test_tasks_from_image_received(labeling_server: LabelingServer, with_images: list[str]) -> None:
    # the fixture published WORK_N images, a duplicate of the first and 2 LL views: wait until all
    # WORK_N + 3 events were handled (the counters add up), then check each outcome exactly
    def all_handled() -> str | None:
        metrics = httpx.get(labeling_server.url + "/metrics").text
        return metrics if counter_total(metrics, "pt_labeling_tasks_created") >= WORK_N + 3 else None

    metrics = eventually(all_handled, 90, 0.2, what="every image.received event handled")
    rows = labeling_server.query("SELECT sop_instance_uid, id FROM labeling_tasks WHERE kind='work'")
    assert sorted(r[0] for r in rows) == sorted(with_images)  # one task each: duplicate and LL views skipped
    for _uid, task_id in rows:
        assert task_id not in with_images and "." not in task_id  # opaque id, not a UID
    assert f'pt_labeling_tasks_created_total{{outcome="created"}} {float(WORK_N)}' in metrics
    assert 'pt_labeling_tasks_created_total{outcome="duplicate"} 1.0' in metrics
    assert 'pt_labeling_tasks_created_total{outcome="skipped_not_eligible"} 2.0' in metrics


def test_roles_and_other_annotators_data(labeling_server: LabelingServer, with_images: list[str]) -> None:
    anon = httpx.Client(base_url=labeling_server.url, follow_redirects=False)
    assert anon.get("/api/next").status_code == 401
    assert anon.get("/owner", headers={"accept": "text/html"}).status_code == 303
    ann = Api(labeling_server.url, *ANNOTATOR)
    for path in ("/owner", "/api/owner/summary", "/api/owner/labels", "/owner/annotators/whoever"):
        assert ann.get(path).status_code == 403, path
    me = ann.get("/api/me").json()
    other = labeling_server.query("SELECT pseudonym FROM labeling_users WHERE name=?", ANNOTATOR2[0])[0][0]
    assert me["annotator_id"] != other
    assert ann.get(f"/owner/annotators/{other}").status_code == 403
    # a work image not handed to this annotator is not visible to them; the owner sees it
    task_id = labeling_server.query("SELECT id FROM labeling_tasks WHERE kind='work' LIMIT 1")[0][0]
    assert ann.get(f"/img/{task_id}.png").status_code == 404
    owner = Api(labeling_server.url, *OWNER)
    res = owner.get(f"/img/{task_id}.png")
    assert res.status_code == 200 and res.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert owner.get("/work").status_code == 403  # owners do not judge


def test_csrf_and_bad_input(labeling_server: LabelingServer, with_images: list[str]) -> None:
    ann = Api(labeling_server.url, *ANNOTATOR2)
    pass_quiz(ann, labeling_server)
    nxt = ann.get("/api/next").json()
    assert nxt["state"] == "work"
    body = {"task_id": nxt["task_id"], "answer": "pneumonia", "confidence": "sure"}
    # no token / wrong token
    assert ann.client.post("/api/judgments", json=body).status_code == 403
    assert ann.client.post("/api/judgments", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert ann.client.post("/answer", data={**body, "csrf_token": "forged"}).status_code == 403
    # forged fields
    assert ann.post("/api/judgments", json={**body, "answer": "maybe"}).status_code == 422
    assert ann.post("/api/judgments", json={**body, "confidence": "very"}).status_code == 422
    assert ann.post("/api/judgments", json={**body, "click_x": 7.0, "click_y": 0.5}).status_code == 422
    assert ann.post("/api/judgments", json={**body, "answer": "cant_tell"}).status_code == 422  # reason needed
    assert ann.post("/api/judgments", json={**body, "task_id": "no-such-task"}).status_code == 404
    assert ann.get("/img/no-such-task.png").status_code == 404
    other_task = next(
        t for (t,) in labeling_server.query("SELECT id FROM labeling_tasks WHERE kind='work'") if t != nxt["task_id"]
    )
    assert ann.post("/api/judgments", json={**body, "task_id": other_task}).status_code == 409  # not given to you
    # first answer counts, the double submission is refused
    assert ann.post("/api/judgments", json=body).status_code == 200
    assert ann.post("/api/judgments", json=body).status_code == 409
    n = labeling_server.query(
        "SELECT count(*) FROM labeling_judgments j JOIN labeling_users u ON u.id=j.user_id "
        "WHERE u.name=? AND j.task_id=? AND j.state!='undone'",
        ANNOTATOR2[0],
        nxt["task_id"],
    )[0][0]
    assert n == 1
    # undo, then answer again; nothing to undo twice
    assert ann.post("/api/undo").json()["task_id"] == nxt["task_id"]
    assert ann.post("/api/undo").status_code == 409
    assert ann.get("/api/next").json()["task_id"] == nxt["task_id"]
    assert ann.post("/api/judgments", json={**body, "answer": "healthy"}).status_code == 200
    # a closed image refuses further answers (wait until the answer above is final, so that no
    # aggregation run is due that would recompute the image's status)
    labeling_server.wait_for("SELECT count(*) FROM labeling_judgments WHERE state='pending'", lambda r: r[0][0] == 0)
    labeling_server.query("UPDATE labeling_tasks SET status='complete' WHERE id=?", other_task)
    labeling_server.query(
        "INSERT INTO labeling_leases (task_id, user_id, leased_at) SELECT ?, id, CURRENT_TIMESTAMP "
        "FROM labeling_users WHERE name=?",
        other_task,
        ANNOTATOR2[0],
    )
    res = ann.post("/api/judgments", json={**body, "task_id": other_task})
    assert res.status_code == 409 and "no more answers" in res.json()["detail"]


def test_xss_reason_is_escaped(labeling_server: LabelingServer, with_images: list[str]) -> None:
    ann = Api(labeling_server.url, *ANNOTATOR)
    pass_quiz(ann, labeling_server)
    nxt = ann.get("/api/next").json()
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    res = ann.post(
        "/api/judgments", json={"task_id": nxt["task_id"], "answer": "cant_tell", "confidence": "sure", "reason": evil}
    )
    assert res.status_code == 200, res.text
    owner = Api(labeling_server.url, *OWNER)
    pseudonym = ann.get("/api/me").json()["annotator_id"]
    page = owner.get(f"/owner/annotators/{pseudonym}", headers={"accept": "text/html"}).text
    assert "&lt;script&gt;alert(" in page
    assert "<script>alert(" not in page and "<img src=x" not in page


def test_events_published_through_outbox(
    labeling_server: LabelingServer, with_images: list[str], rabbit: RabbitNode
) -> None:
    """judgment.submitted and label.aggregated reach the aggregator's queue once the answers are final."""
    from services.core.broker import PermanentError, decode

    ann = Api(labeling_server.url, *ANNOTATOR)
    pass_quiz(ann, labeling_server)
    kinds = dict(labeling_server.query("SELECT id, kind FROM labeling_tasks"))
    gold = gold_answers(labeling_server)  # answer test questions right, so that this annotator is not stopped
    answered = 0
    while answered < 2 and (nxt := ann.get("/api/next").json())["state"] == "work":
        answer = gold.get(nxt["task_id"], "pneumonia")
        res = ann.post("/api/judgments", json={"task_id": nxt["task_id"], "answer": answer, "confidence": "sure"})
        assert res.status_code == 200, res.text
        answered += kinds[nxt["task_id"]] == "work"
    assert answered == 2, nxt
    labeling_server.wait_for("SELECT count(*) FROM labeling_judgments WHERE state='pending'", lambda r: r[0][0] == 0)
    labeling_server.wait_for("SELECT count(*) FROM labeling_outbox WHERE published_at IS NULL", lambda r: r[0][0] == 0)
    got: list[tuple[str, str, object]] = []
    uids = set(with_images)  # other tests on the same broker node publish too: look at ours only
    for msg in take_sync(rabbit.url, "aggregator.events"):
        try:
            env = decode(msg)
        except PermanentError:  # something another test left on the shared node: not ours
            continue
        ours = getattr(env.payload, "image", None) is not None and env.payload.image.sop_instance_uid in uids
        if env.routing_key in ("judgment.submitted", "label.aggregated") and ours:
            got.append((env.routing_key, env.message_id, env.payload))
    judgments = [p for k, _m, p in got if k == "judgment.submitted"]
    assert judgments, "no judgment.submitted on aggregator.events"
    published = labeling_server.query(
        "SELECT message_id FROM labeling_outbox WHERE routing_key='judgment.submitted' AND published_at IS NOT NULL"
    )
    assert {m for k, m, _p in got if k == "judgment.submitted"} == {r[0] for r in published}
    for j in judgments:
        assert isinstance(j, Judgment)
        assert j.annotator_id.startswith("ann-")
        assert j.answer in (Answer.ANSWER_PNEUMONIA, Answer.ANSWER_HEALTHY, Answer.ANSWER_CANT_TELL)
    ids = [m for k, m, _p in got if k == "judgment.submitted"]
    assert all(m.startswith("labeling:") for m in ids) and len(ids) == len(set(ids))
    aggregates = [(m, p) for k, m, p in got if k == "label.aggregated"]
    assert aggregates
    for m, p in aggregates:
        assert isinstance(p, LabelAggregate)
        assert m == f"labeling:{p.image.sop_instance_uid}:agg:{p.revision}"


def test_no_phi_in_any_page_or_api_response(labeling_server: LabelingServer, with_images: list[str]) -> None:
    owner = Api(labeling_server.url, *OWNER)
    ann = Api(labeling_server.url, *ANNOTATOR)
    html = {"accept": "text/html"}
    pseudonym = ann.get("/api/me").json()["annotator_id"]
    responses = [
        httpx.get(labeling_server.url + "/login"),
        httpx.get(labeling_server.url + "/healthz"),
        ann.get("/instructions", headers=html),
        ann.get("/work", headers=html),
        ann.get("/api/next"),
        ann.get("/api/me"),
        owner.get("/owner", headers=html),
        owner.get(f"/owner/annotators/{pseudonym}", headers=html),
        owner.get("/api/owner/summary"),
        owner.get("/api/owner/labels"),
    ]
    for (task_id,) in labeling_server.query("SELECT id FROM labeling_tasks WHERE kind='work'"):
        responses.append(owner.get(f"/img/{task_id}.png"))
    for res in responses:
        assert res.status_code == 200, (res.url, res.status_code)
        body = res.content
        for marker in PHI_MARKERS:
            assert marker.encode() not in body, (res.url, marker)
        for uid in with_images:  # no DICOM UID either: nothing an annotator could join to PHI elsewhere
            assert uid.encode() not in body, res.url


def test_concurrent_double_submission_counts_once(labeling_server: LabelingServer, with_images: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ann = Api(labeling_server.url, *ANNOTATOR2)
    pass_quiz(ann, labeling_server)
    nxt = ann.get("/api/next").json()
    assert nxt["state"] == "work"
    body = {"task_id": nxt["task_id"], "answer": "healthy", "confidence": "sure"}
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: ann.post("/api/judgments", json=body).status_code, range(6)))
    assert sorted(codes) == [200] + [409] * 5
    live = labeling_server.query(
        "SELECT count(*) FROM labeling_judgments j JOIN labeling_users u ON u.id=j.user_id "
        "WHERE u.name=? AND j.task_id=? AND j.state!='undone'",
        ANNOTATOR2[0],
        nxt["task_id"],
    )
    assert live[0][0] == 1


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example", "https://evil.example"])
def test_sign_in_does_not_redirect_off_site(labeling_server: LabelingServer, target: str) -> None:
    client = httpx.Client(base_url=labeling_server.url, follow_redirects=False)
    token = client.get("/api/csrf").json()["csrf_token"]
    res = client.post(
        "/login", data={"name": ANNOTATOR[0], "password": ANNOTATOR[1], "next": target, "csrf_token": token}
    )
    assert res.status_code == 303 and res.headers["location"] == "/"
