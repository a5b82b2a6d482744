"""Structured JSON logs with a correlation id, Prometheus metrics and the /healthz + /metrics app.

Logs never carry patient-identifying fields: the PHI filter blanks any log field whose name says
it is one, whatever the caller passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

PHI_FIELD_NAMES = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "accession_number",
        "accessionnumber",
        "referring_physician_name",
        "referringphysicianname",
        "institution_name",
        "institutionname",
        "other_patient_ids",
    }
)
_STANDARD_RECORD_KEYS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


@contextlib.contextmanager
def bound_correlation_id(value: str | None) -> Iterator[None]:
    token = correlation_id.set(value)
    try:
        yield
    finally:
        correlation_id.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid:
            entry["correlation_id"] = cid
        for key, value in record.__dict__.items():
            if key in _STANDARD_RECORD_KEYS or key.startswith("_"):
                continue
            entry[key] = "[redacted]" if key.lower() in PHI_FIELD_NAMES else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO", as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "pynetdicom", "uvicorn.access", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


def ops_router(service: str, check: HealthCheck | None = None) -> APIRouter:
    """/healthz (200 when every dependency answers, 503 with the failing part) and /metrics."""
    router = APIRouter(tags=["ops"])

    @router.get("/healthz")
    async def healthz() -> Response:
        details: dict[str, Any] = {}
        ok = True
        if check is not None:
            try:
                details = await asyncio.wait_for(check(), timeout=5)
                ok = all(v is True or (isinstance(v, dict) and v.get("ok", True)) for v in details.values())
                # A check marked "critical": false (e.g. SR delivery to PACS) makes the status
                # degraded but keeps HTTP 200: probes must not take the service away for it.
                serving = all(
                    v is True or (isinstance(v, dict) and (v.get("ok", True) or v.get("critical", True) is False))
                    for v in details.values()
                )
            except Exception as exc:  # a failing check is the answer, not a crash
                ok, serving, details = False, False, {"error": repr(exc)}
        else:
            serving = True
        body = {"service": service, "status": "ok" if ok else "degraded", "checks": details}
        return Response(
            json.dumps(body, default=str), status_code=200 if serving else 503, media_type="application/json"
        )

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


def ops_app(service: str, check: HealthCheck | None = None) -> FastAPI:
    app = FastAPI(title=f"pneumotriage {service} ops", docs_url=None, redoc_url=None)
    app.include_router(ops_router(service, check))
    return app


async def serve_http(app: Any, host: str, port: int) -> None:
    """Run an ASGI app with uvicorn inside the current event loop until cancelled."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the service owns signals

    async def serve() -> None:
        # uvicorn calls sys.exit() when it cannot bind. Caught here, inside the task: a SystemExit that
        # leaves a task is re-raised by the event loop itself and ends the process with uvicorn's code
        # instead of letting the service runner stop gracefully (exit 1).
        try:
            await server.serve()
        except SystemExit:
            raise RuntimeError(f"cannot serve HTTP on {host}:{port} (port in use?)") from None

    task = asyncio.ensure_future(serve())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # Ask uvicorn to finish in-flight requests and close, instead of cancelling it mid-request
        # (which works but prints a CancelledError traceback).
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=10)
        raise
