"""What every web app gets besides its routes: a request-body size limit (413), one error handler
that turns validation errors raised anywhere (a query parameter, a form turned into a model inside a
route, a body) into a 4xx instead of an unhandled 500, and the browser security headers on every
response (`SecurityHeaders`).

    app = FastAPI(...)
    harden(app, settings.http_max_body_bytes)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Both apps serve only their own files: scripts and styles from /static (no inline <script>, no
# style attributes, no handlers in markup), images from their own routes, fetch/EventSource to
# themselves. Nothing may frame a page, change the base URL, embed plugins or post a form elsewhere.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS: Mapping[str, str] = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # URLs hold study UIDs: never sent to another site
}


class SecurityHeaders:
    """Pure ASGI middleware: SECURITY_HEADERS on every HTTP response (pages, JSON, images, static
    files, redirects, errors, the worklist's event stream), replacing any a route set itself."""

    def __init__(self, app: ASGIApp, headers: Mapping[str, str] = SECURITY_HEADERS) -> None:
        self.app = app
        self.raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.names = {k for k, _ in self.raw}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message = {**message, "headers": kept + self.raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    """A pydantic model built inside a route from bad input (e.g. an unknown form value) is the
    client's error: 422 with the same body shape as FastAPI's own request validation errors."""
    assert isinstance(exc, ValidationError)
    errors: list[dict[str, Any]] = [
        {k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors(include_url=False)
    ]
    log.info("request refused: invalid input", extra={"path": request.url.path, "errors": len(errors)})
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def harden(app: FastAPI, max_body_bytes: int) -> None:
    """Limit request bodies, install the validation-error handler and the security headers on `app`
    (before its first request).

    The limit is FastAPI's own (`max_body_size`, Starlette's RequestBodyLimitMiddleware): 413 when
    Content-Length announces more, or when a chunked body grows past it while it is read; nothing
    beyond the limit is buffered."""
    app.max_body_size = max_body_bytes
    app.add_exception_handler(ValidationError, validation_error)
    app.add_middleware(SecurityHeaders)
