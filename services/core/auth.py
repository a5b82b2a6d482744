"""Shared web authentication mechanics: password hashes, roles, signed session cookies bound to the
user's database row, CSRF tokens, the one sign-in path (constant time, throttled) and the FastAPI
dependencies `require_role` / `require_csrf`.

Users live in each service's own table; the service hands in two look-ups returning `Account`s:

    sessions = WebSessions(secret_key, "pt_labeling", find_account=by_name, load_account=by_id,
                           end_sessions=bump_session_epoch)
    sessions.install(app)                          # loads/saves the session cookie on every request
    account = await sessions.sign_in(request, name, password)   # None: wrong; LoginThrottled: 429
    await sessions.sign_out(request)               # ends the user's sessions in the database too
    @app.get("/queue")
    async def queue(user: SessionUser = Depends(sessions.require_role("annotator"))): ...
    @app.post("/answer", dependencies=[Depends(require_csrf)]) ...

The session is a dict signed with itsdangerous (URLSafeTimedSerializer, salted with the cookie name),
stored in an HttpOnly, SameSite=Lax cookie. It holds the user's id and an HMAC of the user's stored
password hash and session epoch (as Django's session auth hash): on every request the row is loaded
from the database, the HMAC compared, and the role and name are the database's. A cookie forged with
a leaked signing key therefore names nobody (the forger does not know the salted hash), and a
password change or a deleted user ends every session of that user. Signing out (`sign_out`) adds one
to the user's session epoch in the database (`end_sessions`, one atomic UPDATE), so every cookie
issued before it - a copied or replayed one too - is refused by every replica sharing that
database, well before its max-age; the user's other browsers are signed out with it.

Every session - anonymous ones too, so the sign-in form is protected - carries a random CSRF token;
a POST must echo it in the form field `csrf_token` or the `X-CSRF-Token` header (session-bound
synchronizer token, compared in constant time). The token is rotated at sign-in and sign-out. The
admin role passes every role check.

PT_SECRET_KEY must be at least 32 bytes and not a known placeholder (`check_secret_key`) unless
PT_ALLOW_INSECURE_SECRETS=true (tests, local experiments).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
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


MIN_SECRET_BYTES = 32
# Values shipped in examples and manifests (deploy/k8s/secrets.yaml, .env.example, docs) or that a
# person types when asked for "a secret": refused outside PT_ALLOW_INSECURE_SECRETS.
KNOWN_PLACEHOLDERS = frozenset(
    {
        "change-me-to-a-long-random-string",
        "change-me",
        "changeme",
        "secret",
        "password",
        "pneumotriage",
        "admin",
        "test-secret",
        "replace-with-the-output-of-openssl-rand-hex-32",
    }
)
PLACEHOLDER_MARKERS = ("change-me", "changeme", "change_me", "replace-with", "placeholder", "example")


class InsecureSecretError(RuntimeError):
    """A secret that must not protect a running service (placeholder, too short, low entropy)."""


def secret_problem(value: str) -> str | None:
    """Why `value` is not acceptable as a signing key, or None when it is."""
    lowered = value.strip().lower()
    if lowered in KNOWN_PLACEHOLDERS or any(m in lowered for m in PLACEHOLDER_MARKERS):
        return "it is a known placeholder"
    if len(value.encode()) < MIN_SECRET_BYTES:
        return f"it is shorter than {MIN_SECRET_BYTES} bytes"
    if len(set(value)) < 8:
        return "it has fewer than 8 distinct characters"
    return None


def check_secret_key(value: str, *, allow_insecure: bool, name: str = "PT_SECRET_KEY") -> str:
    """`value` when it is a usable signing key; InsecureSecretError otherwise (a warning in dev mode)."""
    problem = secret_problem(value)
    if problem is None:
        return value
    message = f"{name} is refused: {problem}. Generate one with `openssl rand -hex 32`"
    if not allow_insecure:
        raise InsecureSecretError(message + " (or set PT_ALLOW_INSECURE_SECRETS=true for a throwaway setup).")
    log.warning(message + "; accepted only because PT_ALLOW_INSECURE_SECRETS is set")
    return value


class AuthSettings(CommonSettings):
    """Mix into a service's settings: PT_SECRET_KEY signs session cookies (all replicas must share it)."""

    secret_key: str | None = None
    # Accept a placeholder or short PT_SECRET_KEY (with a warning): tests and throwaway setups only.
    allow_insecure_secrets: bool = False
    # Set true behind HTTPS so cookies are only sent over TLS.
    cookie_secure: bool = False
    session_max_age_s: int = 12 * 3600
    # Failed sign-ins allowed per account name, and per client address, within login_window_s;
    # more answer 429 with Retry-After until the oldest failure leaves the window.
    login_max_failures: int = 5
    login_max_failures_per_client: int = 30
    login_window_s: float = 300.0
    # Largest request body the web apps read (413 above it).
    http_max_body_bytes: int = 1_048_576

    def resolved_secret_key(self) -> str:
        """PT_SECRET_KEY, checked (InsecureSecretError for a placeholder or a short key); unset: a
        random per-process key (sessions end when the process restarts)."""
        if self.secret_key:
            return check_secret_key(self.secret_key, allow_insecure=self.allow_insecure_secrets)
        log.warning("PT_SECRET_KEY is not set: using a random key, sessions end when the process restarts")
        return secrets.token_urlsafe(32)

    def login_throttle(self) -> LoginThrottle:
        return LoginThrottle(self.login_max_failures, self.login_max_failures_per_client, self.login_window_s)


# -- passwords -------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """'scrypt$n$r$p$salt$hash' (base64), with a fresh 16-byte salt."""
    if not password:
        raise ValueError("empty password")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


@cache
def dummy_hash() -> str:
    """A real hash of a random password with the current cost: checked for unknown user names so that
    "no such user" takes as long as "wrong password"."""
    return hash_password(secrets.token_urlsafe(16))


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


# -- sign-in throttling ----------------------------------------------------------------------------


class LoginThrottled(HTTPException):
    """429 with Retry-After: too many failed sign-ins for this account name or from this client."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1, int(retry_after_s + 0.999))
        super().__init__(
            429,
            f"Too many failed sign-ins. Try again in {self.retry_after_s} seconds.",
            headers={"Retry-After": str(self.retry_after_s)},
        )


class LoginThrottle:
    """Sliding-window counts of failed sign-ins per account name and per client address (in this
    process: with N replicas behind a balancer an attacker gets up to N times the budget).

    Unknown names are counted like known ones, so a 429 says nothing about whether a user exists.
    """

    MAX_KEYS = 100_000  # bound memory under a spray of random names/addresses

    def __init__(self, per_account: int = 5, per_client: int = 30, window_s: float = 300.0) -> None:
        self.per_account = per_account
        self.per_client = per_client
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(name: str, client: str) -> tuple[str, str]:
        return "account:" + name.strip().lower(), "client:" + client

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def retry_after(self, name: str, client: str, now: float | None = None) -> float | None:
        """Seconds until another attempt is allowed, or None when it is allowed now."""
        now = time.monotonic() if now is None else now
        account, addr = self._keys(name, client)
        waits = []
        with self._lock:
            for key, limit in ((account, self.per_account), (addr, self.per_client)):
                q = self._recent(key, now)
                if limit > 0 and len(q) >= limit:
                    waits.append(q[len(q) - limit] + self.window_s - now)
        return max(waits) if waits else None

    def failed(self, name: str, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) >= self.MAX_KEYS:
                for key in list(self._failures):
                    self._recent(key, now)
                if len(self._failures) >= self.MAX_KEYS:  # still full: forget the oldest half
                    for key in list(self._failures)[: self.MAX_KEYS // 2]:
                        del self._failures[key]
            for key in self._keys(name, client):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, name: str) -> None:
        """A correct password clears the account's count (not the client's)."""
        with self._lock:
            self._failures.pop(self._keys(name, "")[0], None)


# -- sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionUser:
    id: str
    role: str
    name: str


@dataclass(frozen=True)
class Account:
    """A user row as the web layer needs it (each service maps its own User table to this)."""

    id: str
    role: str
    name: str
    password_hash: str
    # Raised by one at every sign-out: sessions signed with an older epoch are refused.
    session_epoch: int = 0


AccountLookup = Callable[[str], Awaitable[Account | None]]
# end_sessions(account id): raise the user's session epoch in the database (one atomic UPDATE).
SessionEnder = Callable[[str], Awaitable[None]]


def _new_session() -> dict[str, Any]:
    return {"csrf": secrets.token_urlsafe(32)}


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class WebSessions:
    def __init__(
        self,
        secret_key: str,
        cookie_name: str,
        *,
        find_account: AccountLookup,
        load_account: AccountLookup,
        login_path: str = "/login",
        max_age_s: int = 12 * 3600,
        secure: bool = False,
        throttle: LoginThrottle | None = None,
        end_sessions: SessionEnder | None = None,
    ) -> None:
        """find_account(name) and load_account(id) read the service's user table (None: no such user);
        end_sessions(id) raises the user's session epoch there (without it, signing out only
        replaces the browser's cookie: a copy of the old one stays valid until its max-age)."""
        self.cookie_name = cookie_name
        self.login_path = login_path
        self.max_age_s = max_age_s
        self.secure = secure
        self.find_account = find_account
        self.load_account = load_account
        self.throttle = throttle or LoginThrottle()
        self.end_sessions = end_sessions
        self._serializer = URLSafeTimedSerializer(secret_key, salt=f"pt-session:{cookie_name}")
        self._auth_key = hmac.new(secret_key.encode(), b"pt-session-auth:" + cookie_name.encode(), "sha256").digest()

    def auth_hash(self, account: Account) -> str:
        """Binds a session to the row: changes when the password or the session epoch does (sign-out);
        unknown to a cookie forger."""
        bound = f"{account.password_hash}\x00{account.session_epoch}"
        return hmac.new(self._auth_key, bound.encode(), "sha256").hexdigest()

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

    async def _session_user(self, session: dict[str, Any]) -> SessionUser | None:
        """The signed-in user per the database, or None (anonymous, deleted, password changed, forged)."""
        uid, sent = session.get("uid"), session.get("auth")
        if not uid or not isinstance(sent, str):
            return None
        account = await self.load_account(str(uid))
        if account is None or account.role not in ROLES:
            return None
        if not hmac.compare_digest(sent.encode(), self.auth_hash(account).encode()):
            log.warning("session refused: it does not match the user's record", extra={"user_id": str(uid)})
            return None
        return SessionUser(id=account.id, role=account.role, name=account.name)

    def install(self, app: FastAPI) -> None:
        """Add the middleware that loads the session (and its user, from the database) into
        request.state and writes the cookie back when the session changed."""

        @app.middleware("http")
        async def _session_middleware(request: Request, call_next: Any) -> Response:
            data = self.load(request.cookies.get(self.cookie_name))
            request.state.session = data if data is not None else _new_session()
            request.state.session_changed = data is None
            request.state.user = await self._session_user(request.state.session) if data is not None else None
            if data is not None and data.get("uid") and request.state.user is None:
                self.logout(request)  # the user is gone, changed password, or the cookie was forged
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

    async def sign_in(self, request: Request, name: str, password: str) -> Account | None:
        """The one sign-in path of every app: throttle (LoginThrottled = 429), then a password check
        that costs the same for unknown names, then a fresh session bound to the user's row."""
        client = client_address(request)
        wait = self.throttle.retry_after(name, client)
        if wait is not None:
            log.warning(
                "sign-in throttled",
                extra={"cookie": self.cookie_name, "account": name[:100], "client": client, "retry_after_s": wait},
            )
            raise LoginThrottled(wait)
        account = await self.find_account(name)
        stored = account.password_hash if account is not None else dummy_hash()
        ok = await asyncio.to_thread(verify_password, password, stored)
        if not ok or account is None:
            self.throttle.failed(name, client)
            log.info("sign-in failed", extra={"cookie": self.cookie_name, "account": name[:100], "client": client})
            return None
        self.throttle.succeeded(name)
        self.login(request, account)
        log.info("signed in", extra={"cookie": self.cookie_name, "account": account.name, "client": client})
        return account

    def login(self, request: Request, account: Account) -> None:
        if account.role not in ROLES:
            raise ValueError(f"unknown role {account.role!r}")
        request.state.session = {**_new_session(), "uid": account.id, "auth": self.auth_hash(account)}
        request.state.session_changed = True
        request.state.user = SessionUser(id=account.id, role=account.role, name=account.name)

    async def sign_out(self, request: Request) -> None:
        """End the signed-in user's sessions server-side (their epoch is raised in the database, so
        a replayed copy of this cookie is refused by every replica), then give this browser a fresh
        anonymous session."""
        user = current_user(request)
        if user is not None and self.end_sessions is not None:
            await self.end_sessions(user.id)
            log.info("signed out", extra={"cookie": self.cookie_name, "account": user.name})
        self.logout(request)

    def logout(self, request: Request) -> None:
        """Replace this browser's session with a fresh anonymous one (nothing is revoked: see sign_out)."""
        request.state.session = _new_session()
        request.state.session_changed = True
        request.state.user = None

    def require_role(self, *roles: str) -> Callable[[Request], Awaitable[SessionUser]]:
        """Dependency: the signed-in user when their role (from the database) is one of roles (admin
        always passes).

        Not signed in: 401, or a 303 redirect to the sign-in page for browser (HTML) requests.
        Signed in with another role: 403.
        """
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}")

        async def dependency(request: Request) -> SessionUser:
            user = current_user(request)
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
    """The signed-in user as the database has them (set by the session middleware), or None."""
    session_of(request)
    user = getattr(request.state, "user", None)
    return user if isinstance(user, SessionUser) else None


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
