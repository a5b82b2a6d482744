"""The pages of both web apps work under their Content-Security-Policy (issue 22, item 10) in real
headless Chromium: every page is served with the policy, the browser enforces it (an injected inline
script is blocked and reported), and using the pages - the worklist's live update, the study page's
X-ray, heatmap and sliders, the annotator's instructions, quiz image, keyboard and zoom - raises no
violation. The journeys themselves are asserted in test_aggregator_worklist.py and
test_labeling_annotator.py, which run under the same policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.support.aggregator_browser import (  # noqa: F401
    PASSWORD,
    AggregatorServer,
    BrowserThread,
    aggregator_chromium_fixture,
    aggregator_server_fixture,
)
from tests.support.aggregator_service import prediction, received
from tests.support.labeling_service import ANNOTATOR, LabelingServer, labeling_server_fixture  # noqa: F401

pytestmark = pytest.mark.browser

# Recorded in the page before any of its own scripts run (DevTools injection is not subject to CSP).
WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", e => {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "inline") + " " + e.sourceFile);
});
"""


class Watched:
    """A page whose CSP violations (DOM events and console reports) are collected."""

    def __init__(self, context: Any) -> None:
        context.add_init_script(WATCH)
        self.page = context.new_page()
        self.page.set_default_timeout(30_000)
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text) if "Content Security Policy" in m.text else None)

    def goto(self, url: str) -> None:
        response = self.page.goto(url)
        assert response is not None
        self.assert_policy(response)

    def assert_policy(self, response: Any) -> None:
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, (response.url, csp)
        assert response.headers.get("x-frame-options") == "DENY", response.url

    def violations(self) -> list[str]:
        return list(self.page.evaluate("() => window.__cspViolations")) + self.console

    def assert_enforced(self) -> None:
        """An inline script put into the page does not run, and the detector sees it."""
        ran = self.page.evaluate(
            """() => { window.__inlineRan = false; const s = document.createElement("script");
                 s.textContent = "window.__inlineRan = true"; document.body.appendChild(s);
                 return window.__inlineRan }"""
        )
        assert ran is False
        self.page.wait_for_function("() => window.__cspViolations.some(v => v.startsWith('script-src'))")
        self.page.evaluate("() => { window.__cspViolations = [] }")
        self.console.clear()


def test_worklist_pages_work_under_the_policy(
    aggregator_chromium: BrowserThread, aggregator_server: AggregatorServer, shared_data: Path
) -> None:
    aggregator_chromium.run(worklist_scenario, aggregator_server, shared_data)


def worklist_scenario(chromium: Any, server: AggregatorServer, shared_data: Path) -> None:
    first, second = sorted((shared_data / "dicom").glob("*.dcm"))[4:6]
    (study, sop), (study2, sop2) = (
        (str(d.StudyInstanceUID), str(d.SOPInstanceUID))
        for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in (first, second))
    )
    server.add_user("dr-csp", "clinician")
    heat = server.heatmap("heat-csp", (0.5, 0.5))
    server.publish(
        received(sop, study, storage_uri=first.resolve().as_uri()), prediction(sop, 0.96, study=study, heatmap_uri=heat)
    )
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    try:
        w = Watched(context)
        w.goto(server.url + "/login")
        w.page.fill("input[name=username]", "dr-csp")
        w.page.fill("input[name=password]", PASSWORD)
        with w.page.expect_navigation() as nav:
            w.page.click("button[type=submit]")
        w.page.wait_for_url("**/worklist")
        w.assert_policy(nav.value)
        w.page.wait_for_selector(f'tr[data-study="{study}"]:not(.flag-PENDING)', timeout=60_000)
        # live update (EventSource + fetch + innerHTML of the rows) with the page open
        server.publish(
            received(sop2, study2, storage_uri=second.resolve().as_uri()), prediction(sop2, 0.99, study=study2)
        )
        w.page.wait_for_selector(f'tr[data-study="{study2}"][data-flag="URGENT"]', timeout=60_000)
        w.goto(f"{server.url}/studies/{study}")
        for img in ("img.xray", "img.heatmap"):
            w.page.wait_for_function(
                f"() => {{ const i = document.querySelector('{img}'); return i && i.naturalWidth > 0 }}"
            )
        w.page.locator(".zoom").fill("2")
        assert "scale(2)" in (w.page.locator(".stage").get_attribute("style") or "")
        assert w.violations() == []
        w.assert_enforced()
    finally:
        context.close()


def test_labeling_pages_work_under_the_policy(labeling_server: LabelingServer, chromium: Any) -> None:
    context = chromium.new_context(viewport={"width": 1366, "height": 768})
    try:
        w = Watched(context)
        w.goto(labeling_server.url + "/login")
        w.page.get_by_label("Name").fill(ANNOTATOR[0])
        w.page.get_by_label("Password").fill(ANNOTATOR[1])
        w.page.get_by_role("button", name="Sign in").click()
        w.page.wait_for_url("**/instructions")
        examples = w.page.locator(".examples img")
        assert examples.count() >= 4
        w.page.wait_for_function("() => [...document.querySelectorAll('.examples img')].every(i => i.naturalWidth > 0)")
        w.page.get_by_role("button", name="I have read this: start").click()
        w.page.wait_for_url("**/work*")
        w.goto(labeling_server.url + "/work")
        w.page.wait_for_function("() => { const i = document.getElementById('xray'); return i && i.naturalWidth > 0 }")
        w.page.keyboard.press("+")  # app.js: keyboard zoom
        assert "scale(1.25)" in (w.page.locator("#xray").get_attribute("style") or "")
        w.page.locator("#xray").click()  # app.js: the click marker
        assert w.page.locator("#marker").is_visible()
        assert w.violations() == []
        w.assert_enforced()
    finally:
        context.close()
