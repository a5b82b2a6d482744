"""An annotator in real headless Chromium: sign in, instructions, fail then pass the quiz, judge with
the keyboard, undo, see their own accuracy. Screenshots go to the artifacts folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.labeling_service import (  # noqa: F401
    ANNOTATOR,
    OWNER,
    LabelingServer,
    gold_answers,
    labeling_server_fixture,
    work_sources,
)

pytestmark = pytest.mark.browser
WRONG = {"pneumonia": "h", "healthy": "p"}
RIGHT = {"pneumonia": "p", "healthy": "h"}


def press(page, key: str) -> None:
    """Press a judging key and wait for the page it submits to."""
    with page.expect_navigation():
        page.keyboard.press(key)


def current_task(page) -> str:
    return page.locator('input[name="task_id"]').get_attribute("value")


def test_annotator_journey(labeling_server: LabelingServer, chromium, shared_data: Path, artifacts_dir: Path) -> None:
    server = labeling_server
    server.add_work_images([p for p, _ in work_sources(shared_data, 3, offset=400)])
    server.wait_for("SELECT count(*) FROM labeling_tasks WHERE kind='work'", lambda r: r[0][0] >= 3, 90)
    gold = gold_answers(server)
    shots = artifacts_dir / "labeling"
    shots.mkdir(exist_ok=True)
    context = chromium.new_context(viewport={"width": 1366, "height": 768})  # a laptop screen
    page = context.new_page()
    page.set_default_timeout(30_000)

    # sign in (the work page sends us to the sign-in page and back)
    page.goto(server.url + "/work")
    assert "/login" in page.url
    page.get_by_label("Name").fill(ANNOTATOR[0])
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    assert "Wrong name or password" in page.content()
    page.get_by_label("Password").fill(ANNOTATOR[1])
    page.get_by_role("button", name="Sign in").click()

    # instructions with examples from the gold set
    page.wait_for_url("**/instructions")
    assert "diagnostic aid" in page.content()
    examples = page.locator(".examples img")
    assert examples.count() >= 4
    assert all(examples.nth(i).evaluate("img => img.naturalWidth > 0") for i in range(examples.count()))
    page.screenshot(path=str(shots / "01-instructions.png"), full_page=True)
    page.get_by_role("button", name="I have read this: start").click()

    # quiz, attempt 1: every answer wrong, with the reason shown after each miss
    page.wait_for_url("**/work*")
    assert "Quiz" in page.locator(".status").inner_text()
    for i in range(8):
        assert f"question {i + 1} of 8" in page.locator(".status").inner_text()
        press(page, WRONG[gold[current_task(page)]])
        feedback = page.locator("#feedback")
        assert "not quite right" in feedback.inner_text() and len(feedback.inner_text()) > 40
        if i == 0:
            page.screenshot(path=str(shots / "02-quiz-miss.png"), full_page=True)
    assert "attempt 2" in page.locator(".status").inner_text()
    assert "Quiz attempt 1: 0 of 8 right" in page.locator("#quiz-result").inner_text()
    assert "Not passed yet" in page.locator("#quiz-result").inner_text()

    # attempt 2: all right -> passed, on to work
    for _ in range(8):
        press(page, RIGHT[gold[current_task(page)]])
    assert "You passed" in page.locator("#quiz-result").inner_text()
    assert "Answered: 0" in page.locator("#progress").inner_text()
    assert "none yet" in page.locator("#accuracy").inner_text()

    # accessible form: every visible control has a label
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), button, select')]
             .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
             .map(e => e.outerHTML)"""
    )
    assert unlabeled == []

    # judge with the keyboard: click the opacity, "probably", pneumonia
    first = current_task(page)
    page.locator("#xray").click(position={"x": 100, "y": 120})
    page.keyboard.press("2")
    page.keyboard.press("+")
    page.screenshot(path=str(shots / "03-judging.png"), full_page=True)
    press(page, "p")
    assert "Answered: 1" in page.locator("#progress").inner_text()
    row = server.query(
        "SELECT answer, confidence, click_x FROM labeling_judgments WHERE task_id=? AND state!='undone'", first
    )
    assert row and row[0][0] == "pneumonia" and row[0][1] == "probably" and row[0][2] is not None

    # undo: the same image comes back, the answer is withdrawn
    press(page, "u")
    assert current_task(page) == first
    assert "Answered: 0" in page.locator("#progress").inner_text()
    assert server.query("SELECT state FROM labeling_judgments WHERE task_id=?", first) == [("undone",)]

    # keep judging; when a hidden test question comes, miss it: the page looks exactly as after a
    # work image (no feedback yet), and the result is revealed gold.feedback_delay (3) answers later
    kinds = dict(server.query("SELECT id, kind FROM labeling_tasks"))
    for _ in range(12):
        task = current_task(page)
        if kinds[task] == "hidden":
            press(page, WRONG[gold[task]])
            assert page.locator("#feedback").count() == 0 and page.locator("#gold-feedback").count() == 0
            assert "none yet" in page.locator("#accuracy").inner_text()
            for i in range(3):
                assert page.locator("#gold-feedback").count() == 0, i
                nxt = current_task(page)
                press(page, RIGHT[gold[nxt]] if nxt in gold else "h")
            assert "not quite right" in page.locator("#gold-feedback").inner_text()
            assert "0% of 1" in page.locator("#accuracy").inner_text()
            page.screenshot(path=str(shots / "04-own-accuracy.png"), full_page=True)
            page.get_by_role("link", name="Test-question results").click()
            page.wait_for_url("**/feedback")
            assert "0 of 1 right" in page.locator("#feedback-score").inner_text()
            break
        press(page, "h")
    else:
        pytest.fail("no hidden test question was served")
    # an annotator cannot open the owner pages
    res = page.goto(server.url + "/owner")
    assert res is not None and res.status == 403
    context.close()


def test_owner_pages(labeling_server: LabelingServer, chromium, artifacts_dir: Path) -> None:
    context = chromium.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(labeling_server.url + "/")
    page.get_by_label("Name").fill(OWNER[0])
    page.get_by_label("Password").fill(OWNER[1])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/owner")
    assert page.locator("#images").inner_text().strip().isdigit()
    for heading in ("Progress", "Annotators", "Contested test questions"):
        assert page.get_by_role("heading", name=heading).is_visible()
    pseudonym = labeling_server.query("SELECT pseudonym FROM labeling_users WHERE name=?", ANNOTATOR[0])[0][0]
    assert pseudonym in page.locator("#annotators").inner_text()
    page.screenshot(path=str(artifacts_dir / "labeling" / "05-owner.png"), full_page=True)
    page.get_by_role("link", name=pseudonym).click()
    page.wait_for_url(f"**/owner/annotators/{pseudonym}")
    assert pseudonym in page.locator("h1").inner_text()
    context.close()
