"""End to end, every part real: dcmtk storescu sends 50 real chest X-rays (DX, JPEG baseline) and
Orthanc, as the PACS, forwards 6 more -> ingest -> RabbitMQ -> inference + labeling -> a simulated
crowd answers through the labeling HTTP API -> aggregator -> flags in the worklist JSON API and in
headless Chromium, and DICOM SR results back in Orthanc. Every image is accounted for, and an
image's SOPInstanceUID is found as correlation_id in all four services' JSON logs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.dicom_peers import Orthanc
from harness.rabbitmq import RabbitNode
from harness.system_harness import SendResult, SystemHarness
from harness.system_reconcile import Reconciliation, wait_reconciled
from harness.system_scenario import (
    CLINICIAN,
    FAST_ENV,
    Batch,
    gold_folder,
    link_truth,
    make_batch,
    model_env,
    run_crowd,
    seed_accounts_and_gold,
)

N_IMAGES = 50  # sent by dcmtk storescu
N_PACS = 6  # forwarded by Orthanc
FLAGS = {"URGENT", "PNEUMONIA_SUSPECTED", "UNCERTAIN", "LIKELY_HEALTHY", "NOT_TRIAGED"}


@dataclass
class E2ERun:
    system: SystemHarness
    batch: Batch
    pacs_batch: Batch
    sent: SendResult
    model_only: Reconciliation
    after_crowd: Reconciliation
    crowd_output: str
    orthanc: Orthanc

    @property
    def studies(self) -> set[str]:
        return self.batch.studies | self.pacs_batch.studies


@pytest.fixture(scope="module")
def e2e(rabbit: RabbitNode, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ERun]:
    base = tmp_path_factory.mktemp("system-e2e")
    batch = make_batch(shared_data, base / "dicom", N_IMAGES)
    pacs_batch = make_batch(shared_data, base / "pacs", N_PACS, seed=99)
    sources = {m.source for m in batch.images + pacs_batch.images}
    gold = gold_folder(shared_data, base / "gold", exclude=sources)
    truth = link_truth([(m.source, m.label) for m in batch.images + pacs_batch.images], base / "truth")
    # Orthanc is the PACS: it forwards studies to us and receives our DICOM SR results
    orthanc = Orthanc(base_dir=base / "orthanc").start()
    env = {
        **FAST_ENV,
        **model_env(),
        "PT_AGGREGATOR_SR_DESTINATION": f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        "PT_AGGREGATOR_SR_RETRY_SECONDS": "2",
    }
    system = SystemHarness(rabbit, base / "system", env=env)
    try:
        system.start()
        seed_accounts_and_gold(system, gold)
        sent = system.send(batch.paths, associations=2)
        acked = batch.acked_uids(sent)
        orthanc.add_modality("pt", system.config.ae_title, "127.0.0.1", system.dicom_port)
        studies = {orthanc.upload(m.path)["ParentStudy"] for m in pacs_batch.images}
        job = orthanc.store_to("pt", sorted(studies))
        assert job.get("FailedInstancesCount", 0) == 0, job
        acked |= {m.sop_instance_uid for m in pacs_batch.images}
        t0 = time.monotonic()
        model_only = wait_reconciled(system, acked, timeout=240)
        t1 = time.monotonic()
        crowd = run_crowd(system, [truth, gold], annotators="expert:3,careless:1")
        t2 = time.monotonic()
        after = wait_reconciled(system, acked, timeout=120)
        print(f"model-only flags {t1 - t0:.1f} s, crowd {t2 - t1:.1f} s, settle {time.monotonic() - t2:.1f} s")
        yield E2ERun(system, batch, pacs_batch, sent, model_only, after, crowd, orthanc)
    finally:
        system.stop()
        orthanc.stop()


def test_every_image_is_acknowledged_and_accounted_for(e2e: E2ERun) -> None:
    assert len(e2e.sent.acked) == N_IMAGES, e2e.sent.refused
    for rec in (e2e.model_only, e2e.after_crowd):
        assert rec.problems() == [], rec.table()
        assert rec.acked == {m.sop_instance_uid for m in e2e.batch.images + e2e.pacs_batch.images}
        assert rec.flagged() >= rec.acked
        assert set(rec.study_flags) == e2e.studies
        assert set(rec.study_flags.values()) <= FLAGS
        assert not rec.dead_lettered, "healthy input must not be dead-lettered"


def test_labeling_yields_the_cpu_to_the_flag_path(e2e: E2ERun) -> None:
    """PT_LABELING_CPU_NICE (default 10): every labeling thread runs at nice 10 and, where the
    kernel shares CPU by session (autogroups), so does its session; the flag path stays at 0."""

    def nices(pid: int) -> set[int]:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return {int((t / "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in tasks}

    pids = {name: child.pid for name, child in e2e.system.children.items()}
    assert nices(pids["labeling"]) == {10}
    for name in ("ingest", "inference", "aggregator"):
        assert nices(pids[name]) == {0}, name
    group = Path(f"/proc/{pids['labeling']}/autogroup")
    if group.exists() and Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1":
        assert group.read_text().strip().endswith("nice 10")


def test_crowd_votes_reach_the_aggregator(e2e: E2ERun) -> None:
    import sqlite3

    db = e2e.system.data_dir / "aggregator.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        voted = conn.execute("SELECT count(DISTINCT study_uid) FROM aggregator_studies WHERE human_judgments > 0")
        n_voted = voted.fetchone()[0]
        n_judgments = conn.execute("SELECT count(*) FROM aggregator_judgments").fetchone()[0]
    assert "accuracy" in e2e.crowd_output
    assert n_judgments >= N_IMAGES, "the crowd's judgments were published and consumed"
    assert n_voted == len(e2e.studies), "every study carries human votes after the crowd ran"


def _metric(text: str, family_name: str, sample_name: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            return sum(s.value for s in family.samples if s.name == sample_name)
    return 0.0


def test_end_to_end_latency_metric(e2e: E2ERun) -> None:
    text = e2e.system.metrics_text("aggregator")
    count = _metric(text, "pt_aggregator_time_to_first_flag_seconds", "pt_aggregator_time_to_first_flag_seconds_count")
    total = _metric(text, "pt_aggregator_time_to_first_flag_seconds", "pt_aggregator_time_to_first_flag_seconds_sum")
    assert count == len(e2e.studies), "one first-flag observation per study"
    assert 0 < total / count < 600


def test_correlation_id_follows_an_image_through_every_service(e2e: E2ERun) -> None:
    for image in e2e.batch.images[:3] + e2e.pacs_batch.images[:2]:
        uid = image.sop_instance_uid
        found: dict[str, int] = {}
        for service in ("ingest", "inference", "labeling", "aggregator"):
            lines = [json.loads(line) for line in e2e.system.log_text(service).splitlines() if uid in line]
            found[service] = sum(1 for entry in lines if entry.get("correlation_id") == uid)
        assert all(found.values()), f"{uid} missing from some service's logs as correlation_id: {found}"


def test_logs_carry_no_phi(e2e: E2ERun) -> None:
    markers = ["Systest^Patient", "SYSTEST-", "SYSACC"]
    for service in ("ingest", "inference", "labeling", "aggregator"):
        text = e2e.system.log_text(service)
        assert not [m for m in markers if m in text], f"{service} logged a patient field"


@pytest.mark.browser
def test_flags_visible_in_worklist_api_and_chromium(e2e: E2ERun, chromium: object, artifacts_dir: Path) -> None:
    context = chromium.new_context(base_url=e2e.system.url("aggregator"))  # type: ignore[attr-defined]
    try:
        page = context.new_page()
        page.goto("/login")
        page.fill("input[name=username]", CLINICIAN[0])
        page.fill("input[name=password]", CLINICIAN[1])
        page.click("button[type=submit]")
        page.wait_for_url("**/worklist**")
        # the JSON API, with the browser's session
        resp = page.request.get("/api/v1/studies?page_size=500")
        assert resp.ok, f"{resp.status} {resp.text()[:500]}"
        api = resp.json()
        assert api["total"] == len(e2e.studies)
        by_study = {item["study_uid"]: item["flag"] for item in api["items"]}
        assert set(by_study) == e2e.studies
        assert set(by_study.values()) <= FLAGS
        assert by_study == {s: e2e.after_crowd.study_flags[s] for s in by_study}
        # the worklist page shows them, most urgent first
        page.wait_for_selector("tr[data-study]")
        rows = page.locator("tr[data-study]")
        shown = {
            rows.nth(i).get_attribute("data-study"): rows.nth(i).get_attribute("data-flag") for i in range(rows.count())
        }
        assert shown and all(by_study[s] == f for s, f in shown.items())
        assert "diagnostic aid" in page.content().lower()
        page.screenshot(path=str(artifacts_dir / "system-e2e-worklist.png"), full_page=True)
    finally:
        context.close()


def test_results_reach_the_pacs_as_dicom_sr(e2e: E2ERun) -> None:
    """The aggregator C-STOREs a DICOM SR per study result to the PACS (Orthanc), which parses it."""

    def sr_studies() -> set[str]:
        found = e2e.orthanc.request(
            "POST", "/tools/find", {"Level": "Series", "Query": {"Modality": "SR"}, "Expand": True}
        )
        studies = set()
        for series in found:
            study = e2e.orthanc.get(f"/studies/{series['ParentStudy']}")
            studies.add(study["MainDicomTags"]["StudyInstanceUID"])
        return studies

    SystemHarness.wait_for(lambda: sr_studies() >= e2e.studies, timeout=120, what="an SR in the PACS for every study")
