"""What every web app gets besides its routes: a request-body size limit (413) and one error handler
that turns validation errors raised anywhere (a query parameter, a form turned into a model inside a
route, a body) into a 4xx instead of an unhandled 500.

    app = FastAPI(...)
    harden(app, settings.http_max_body_bytes)
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

log = logging.getLogger(__name__)


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
    """Limit request bodies and install the validation-error handler on `app` (before its first request).

    The limit is FastAPI's own (`max_body_size`, Starlette's RequestBodyLimitMiddleware): 413 when
    Content-Length announces more, or when a chunked body grows past it while it is read; nothing
    beyond the limit is buffered."""
    app.max_body_size = max_body_bytes
    app.add_exception_handler(ValidationError, validation_error)
