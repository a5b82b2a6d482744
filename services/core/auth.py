"""Shared web authentication mechanics: password hashes, roles, signed session cookies, CSRF tokens
and the FastAPI dependencies `require_role` / `require_csrf`.

Users live in each service's own table; this module only provides the mechanics.

    sessions = WebSessions(secret_key, cookie_name="pt_labeling")
    sessions.install(app)                          # loads/saves the session cookie on every request
    sessions.login(request, user_id="7", role="annotator", name="ann1")   # after checking the password
    @app.get("/queue")
    async def queue(user: SessionUser = Depends(sessions.require_role("annotator"))): ...
    @app.post("/answer", dependencies=[Depends(require_csrf)]) ...

The session is a dict signed with itsdangerous (URLSafeTimedSerializer, salted with the cookie name),
stored in an HttpOnly, SameSite=Lax cookie. Every session - anonymous ones too, so the sign-in form
is protected - carries a random CSRF token; a POST must echo it in the form field `csrf_token` or the
`X-CSRF-Token` header (session-bound synchronizer token, compared in constant time). The token is
rotated at sign-in and sign-out. The admin role passes every role check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from services.core.settings import CommonSettings

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("annotator", "owner", "clinician", "admin")
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

# scrypt cost: n=2**14, r=8, p=1 takes ~50 ms and 16 MiB per hash (OWASP's minimum is n=2**17 with
# r=8 for interactive logins on a server; raise SCRYPT_N where hardware allows).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class AuthSettings(CommonSettings):
    """Mix into a service's settings: PT_SECRET_KEY signs session cookies (all replicas must share it)."""

    secret_key: str | None = None
    # Set true behind HTTPS so cookies are only sent over TLS.
    cookie_secure: bool = False
    session_max_age_s: int = 12 * 3600

    def resolved_secret_key(self) -> str:
        if self.secret_key:
            return self.secret_key
        log.warning("PT_SECRET_KEY is not set: using a random key, sessions end when the process restarts")
        return secrets.token_urlsafe(32)


# -- passwords -------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """'scrypt$n$r$p$salt$hash' (base64), with a fresh 16-byte salt."""
    if not password:
        raise ValueError("empty password")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of password against a hash_password() string; False for any malformed hash."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest_b64)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt_b64),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# -- sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionUser:
    id: str
    role: str
    name: str


UserCheck = Callable[[Request, SessionUser], Awaitable[bool]]


def _new_session() -> dict[str, Any]:
    return {"csrf": secrets.token_urlsafe(32)}


class WebSessions:
    def __init__(
        self,
        secret_key: str,
        cookie_name: str,
        *,
        login_path: str = "/login",
        max_age_s: int = 12 * 3600,
        secure: bool = False,
        user_check: UserCheck | None = None,
    ) -> None:
        """user_check(request, user) -> False ends the session (e.g. the user was disabled in the DB)."""
        self.cookie_name = cookie_name
        self.login_path = login_path
        self.max_age_s = max_age_s
        self.secure = secure
        self.user_check = user_check
        self._serializer = URLSafeTimedSerializer(secret_key, salt=f"pt-session:{cookie_name}")

    # cookie <-> dict
    def load(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # also covers SignatureExpired
            return None
        return data if isinstance(data, dict) and isinstance(data.get("csrf"), str) else None

    def dump(self, data: dict[str, Any]) -> str:
        return str(self._serializer.dumps(data))

    def install(self, app: FastAPI) -> None:
        """Add the middleware that loads the session into request.state and writes it back when changed."""

        @app.middleware("http")
        async def _session_middleware(request: Request, call_next: Any) -> Response:
            data = self.load(request.cookies.get(self.cookie_name))
            request.state.session = data if data is not None else _new_session()
            request.state.session_changed = data is None
            response: Response = await call_next(request)
            if request.state.session_changed:
                response.set_cookie(
                    self.cookie_name,
                    self.dump(request.state.session),
                    max_age=self.max_age_s,
                    httponly=True,
                    samesite="lax",
                    secure=self.secure,
                    path="/",
                )
            return response

        app.state.web_sessions = self

    def login(self, request: Request, *, user_id: str, role: str, name: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        request.state.session = {**_new_session(), "uid": str(user_id), "role": role, "name": name}
        request.state.session_changed = True

    def logout(self, request: Request) -> None:
        request.state.session = _new_session()
        request.state.session_changed = True

    def require_role(self, *roles: str) -> Callable[[Request], Awaitable[SessionUser]]:
        """Dependency: the signed-in user when their role is one of roles (admin always passes).

        Not signed in: 401, or a 303 redirect to the sign-in page for browser (HTML) requests.
        Signed in with another role: 403.
        """
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}")

        async def dependency(request: Request) -> SessionUser:
            user = current_user(request)
            if user is not None and self.user_check is not None and not await self.user_check(request, user):
                self.logout(request)
                user = None
            if user is None:
                if "text/html" in request.headers.get("accept", ""):
                    target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
                    raise HTTPException(303, "sign in first", headers={"Location": f"{self.login_path}?next={target}"})
                raise HTTPException(401, "sign in first")
            if user.role != "admin" and user.role not in roles:
                raise HTTPException(403, "your role cannot do this")
            return user

        return dependency


def session_of(request: Request) -> dict[str, Any]:
    session = getattr(request.state, "session", None)
    if session is None:
        raise RuntimeError("WebSessions.install(app) first")
    return session


def current_user(request: Request) -> SessionUser | None:
    s = session_of(request)
    if not s.get("uid") or s.get("role") not in ROLES:
        return None
    return SessionUser(id=str(s["uid"]), role=str(s["role"]), name=str(s.get("name", "")))


def csrf_token(request: Request) -> str:
    """The token to put in every form (hidden field csrf_token) or X-CSRF-Token header."""
    return str(session_of(request)["csrf"])


async def require_csrf(request: Request) -> None:
    """Dependency for every state-changing request: 403 unless the session's CSRF token is echoed."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    sent = request.headers.get(CSRF_HEADER)
    if not sent and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), csrf_token(request).encode()):
        raise HTTPException(403, "missing or invalid CSRF token")
