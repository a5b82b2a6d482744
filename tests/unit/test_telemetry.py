"""JSON logs (correlation id, PHI redaction) and the /healthz + /metrics ops app."""

from __future__ import annotations

import json
import logging

import httpx

from services.core.telemetry import JsonFormatter, bound_correlation_id, ops_app


def _format(record_extra: dict[str, object]) -> dict[str, object]:
    record = logging.makeLogRecord({"msg": "stored instance", "levelname": "INFO", "name": "t", **record_extra})
    return json.loads(JsonFormatter("ingest").format(record))


def test_log_line_is_json_with_service_and_correlation_id() -> None:
    with bound_correlation_id("1.2.840.99"):
        entry = _format({"sop_instance_uid": "1.2.840.99"})
    assert entry["service"] == "ingest"
    assert entry["correlation_id"] == "1.2.840.99"
    assert entry["sop_instance_uid"] == "1.2.840.99"


def test_phi_fields_are_redacted_whatever_the_caller_passes() -> None:
    entry = _format({"patient_name": "Sample^Patient1", "PatientID": "KERMANY-1", "accession_number": "ACC1"})
    text = json.dumps(entry)
    for marker in ("Sample^Patient1", "KERMANY-1", "ACC1"):
        assert marker not in text
    assert entry["patient_name"] == "[redacted]"


async def test_healthz_reports_ok_and_degraded() -> None:
    state = {"broker": True}

    async def check() -> dict[str, object]:
        return dict(state)

    app = ops_app("test", check)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ok = await client.get("/healthz")
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        state["broker"] = False
        bad = await client.get("/healthz")
        assert bad.status_code == 503 and bad.json()["checks"] == {"broker": False}
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "python_info" in metrics.text


async def test_healthz_check_that_raises_is_degraded_not_a_crash() -> None:
    async def check() -> dict[str, object]:
        raise ConnectionError("db gone")

    app = ops_app("test", check)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        resp = await client.get("/healthz")
    assert resp.status_code == 503 and "db gone" in resp.text


async def test_serve_http_answers_then_stops_cleanly_when_cancelled() -> None:
    import asyncio

    from services.core.net import free_port
    from services.core.telemetry import serve_http

    port = free_port()
    task = asyncio.create_task(serve_http(ops_app("test"), "127.0.0.1", port))
    from harness.wait import eventually_async

    async with httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{port}/healthz"
        resp = await eventually_async(lambda: client.get(url), 10, 0.05, ignore=(httpx.ConnectError,))
        assert resp.status_code == 200
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    async with httpx.AsyncClient() as client:
        try:
            await client.get(f"http://127.0.0.1:{port}/healthz")
            raise AssertionError("server still answering after cancel")
        except httpx.ConnectError:
            pass
