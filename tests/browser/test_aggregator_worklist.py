"""The clinician worklist in real headless Chromium against the real aggregator service fed by
real RabbitMQ events: order, live update, open a study (X-ray, heatmap, votes, history, disclaimer),
overrule; and roles (annotators and strangers do not get in). Screenshots go to artifacts_dir.

Chromium is driven on its own thread (tests/support/aggregator_browser.BrowserThread, same binary and
flags as the `chromium` fixture) so that Playwright's running loop never sits on the main thread,
where it would break every later asyncio test of the session."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.support.aggregator_browser import (  # noqa: F401
    PASSWORD,
    AggregatorServer,
    BrowserThread,
    aggregator_chromium_fixture,
    aggregator_server_fixture,
)
from tests.support.aggregator_service import judgment, prediction, received

pytestmark = pytest.mark.browser


def dicoms(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "dicom").glob("*.dcm"))


def ids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientName)


def sign_in(page, server: AggregatorServer, name: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(server.url + "/worklist")
    assert "/login" in page.url
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")


def study_order(page, ours: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
    rows = page.locator("tr.study").evaluate_all("rs => rs.map(r => r.dataset.study)")
    return [r for r in rows if r in ours]


def test_worklist_order_live_update_study_page_and_overrule(
    aggregator_chromium: BrowserThread, aggregator_server: AggregatorServer, shared_data: Path, artifacts_dir: Path
) -> None:
    aggregator_chromium.run(worklist_scenario, aggregator_server, shared_data, artifacts_dir)


def worklist_scenario(chromium, server: AggregatorServer, shared_data: Path, artifacts_dir: Path) -> None:  # type: ignore[no-untyped-def]
    files = dicoms(shared_data)
    (s_healthy, i_healthy, _), (s_urgent, i_urgent, urgent_name), (s_unc, i_unc, _) = (ids(f) for f in files[:3])
    server.add_user("dr-house", "clinician")
    heat = server.heatmap("heat-urgent", (0.3, 0.6))
    server.publish(
        received(i_healthy, s_healthy, storage_uri=files[0].resolve().as_uri()),
        received(i_urgent, s_urgent, storage_uri=files[1].resolve().as_uri()),
        received(i_unc, s_unc, storage_uri=files[2].resolve().as_uri()),
        prediction(i_healthy, 0.03, study=s_healthy),
        prediction(i_urgent, 0.95, study=s_urgent, heatmap_uri=heat),
        judgment(i_urgent, "b-j1", True, study=s_urgent),
        judgment(i_urgent, "b-j2", True, trust=0.7, study=s_urgent),
        prediction(i_unc, 0.5, study=s_unc),
    )
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        sign_in(page, server, "dr-house")
        page.wait_for_url("**/worklist")
        ours = {s_healthy, s_urgent, s_unc}
        page.wait_for_function(
            "n => document.querySelectorAll('tr.study:not(.flag-PENDING)').length >= n", arg=3, timeout=60_000
        )
        page.reload()
        assert study_order(page, ours) == [s_urgent, s_unc, s_healthy]
        assert page.locator(f'tr[data-study="{s_urgent}"]').get_attribute("data-flag") == "URGENT"
        # Badge colours come from the flag registry (/flags.css, services/aggregator/flags.py), as before.
        badge = page.locator(f'tr[data-study="{s_urgent}"] .badge')
        assert badge.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(176, 0, 32)"
        assert "not a diagnosis" in page.locator("[data-testid=disclaimer]").inner_text()
        page.screenshot(path=str(artifacts_dir / "aggregator-worklist.png"), full_page=True)

        # Live update: a new urgent study arrives while the page is open (no reload).
        s_new, i_new, _ = ids(files[3])
        server.publish(
            received(i_new, s_new, storage_uri=files[3].resolve().as_uri()), prediction(i_new, 0.99, study=s_new)
        )
        page.wait_for_selector(f'tr[data-study="{s_new}"][data-flag="URGENT"]', timeout=60_000)
        ours.add(s_new)
        assert study_order(page, ours) == [s_urgent, s_new, s_unc, s_healthy]  # urgency, then arrival
        page.screenshot(path=str(artifacts_dir / "aggregator-worklist-live.png"), full_page=True)

        # Filter by flag.
        page.goto(server.url + "/worklist?flag=LIKELY_HEALTHY")
        assert study_order(page, ours) == [s_healthy]

        # Open the urgent study: the X-ray rendered from DICOM, heatmap, votes, history, disclaimer.
        page.goto(server.url + "/worklist")
        page.click(f'tr[data-study="{s_urgent}"] td a >> nth=0')
        page.wait_for_url(f"**/studies/{s_urgent}")
        assert "Urgent" in page.locator("#flag").inner_text()
        assert urgent_name.replace("^", " ") in page.locator("h1").inner_text()  # clinicians see the patient
        page.wait_for_function("() => { const i = document.querySelector('img.xray'); return i && i.naturalWidth > 0 }")
        page.wait_for_function(
            "() => { const i = document.querySelector('img.heatmap'); return i && i.naturalWidth > 0 }"
        )
        assert "Diagnostic aid — not a diagnosis" in page.content()
        assert page.locator("table.votes tbody tr").count() == 2
        assert "agreement 100 %" in page.locator(".crowd").inner_text()
        assert page.locator("#history tbody tr").count() >= 1
        page.locator(".zoom").fill("2")
        assert "scale(2)" in page.locator(".stage").get_attribute("style")
        page.locator(".contrast").fill("1.5")
        assert "contrast(1.5)" in page.locator("img.xray").get_attribute("style")
        page.screenshot(path=str(artifacts_dir / "aggregator-study.png"), full_page=True)

        # Overrule: stored, shown in the history, and the worklist re-sorts.
        page.select_option("#overrule-flag", "LIKELY_HEALTHY")
        page.fill("input[name=comment]", "artefact, lungs clear")
        page.click("#overrule")
        page.wait_for_url(f"**/studies/{s_urgent}")
        assert "Likely healthy" in page.locator("#flag").inner_text()
        top = page.locator("#history tbody tr").first.inner_text()
        assert "clinician" in top and "artefact, lungs clear" in top
        page.screenshot(path=str(artifacts_dir / "aggregator-overruled.png"), full_page=True)
        page.goto(server.url + "/worklist")
        assert study_order(page, ours)[-1] in (s_urgent, s_healthy)
        assert study_order(page, ours)[:2] == [s_new, s_unc]
    finally:
        context.close()


def test_roles_annotators_and_strangers_do_not_get_in(
    aggregator_chromium: BrowserThread, aggregator_server: AggregatorServer, artifacts_dir: Path
) -> None:
    aggregator_chromium.run(roles_scenario, aggregator_server, artifacts_dir)


def roles_scenario(chromium, server: AggregatorServer, artifacts_dir: Path) -> None:  # type: ignore[no-untyped-def]
    server.add_user("ann-1", "annotator")
    context = chromium.new_context()
    page = context.new_page()
    try:
        sign_in(page, server, "ann-1")
        assert "Not allowed" in page.content()
        response = page.goto(server.url + "/worklist")
        assert response is not None and response.status == 403
        assert page.locator("tr.study").count() == 0
        page.screenshot(path=str(artifacts_dir / "aggregator-annotator-refused.png"))
        response = page.goto(server.url + "/api/v1/studies")
        assert response is not None and response.status == 403
        # wrong password: stays on the sign-in page
        context.clear_cookies()
        page.goto(server.url + "/login")
        page.fill("input[name=username]", "ann-1")
        page.fill("input[name=password]", "wrong")
        page.click("button[type=submit]")
        assert "Wrong user name or password" in page.content()
    finally:
        context.close()


def test_service_logs_carry_no_phi(aggregator_server: AggregatorServer, shared_data: Path) -> None:
    """After the scenarios above (the service read patient names/ids from DICOM for display), its
    JSON logs hold none of them."""
    import json

    log = (aggregator_server.data_dir / "aggregator.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(entry.get("msg") == "triage updated" for entry in lines), "the log is the service's"
    for path in dicoms(shared_data)[:4]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for value in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientName).replace("^", " ")):
            assert value not in log
