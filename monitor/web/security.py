"""Sessions, CSRF tokens, the sign-in rate limit and the security headers of the inbox.

Sessions are held by the server (in memory: a restart signs everybody out) and named by a random id in a signed,
HttpOnly, SameSite=Strict cookie; one unused for `idle` seconds expires. Automatic requests (the inbox's polling)
do not count as use. Every session, signed in or not, carries a CSRF token that each state-changing form posts
back. Neither passwords nor session ids nor tokens are logged.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, Signer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "pm_session"
MAX_SESSIONS = 10_000

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass
class Session:
    sid: str
    csrf: str
    username: str | None = None
    last_used: float = field(default_factory=time.monotonic)
    pending: dict[str, str] | None = None  # an OpenID Connect sign-in under way: state, nonce, PKCE verifier


class Sessions:
    def __init__(self, *, secret: str, idle_seconds: float) -> None:
        self._signer = Signer(secret, salt="protocol-monitor.session")
        self.idle = idle_seconds
        self._lock = threading.Lock()
        self._by_sid: dict[str, Session] = {}

    def new(self, username: str | None = None) -> Session:
        with self._lock:
            if len(self._by_sid) >= MAX_SESSIONS:
                self._prune()
                while len(self._by_sid) >= MAX_SESSIONS:  # drop the least recently used
                    oldest = min(self._by_sid.values(), key=lambda s: s.last_used)
                    del self._by_sid[oldest.sid]
            session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), username)
            self._by_sid[session.sid] = session
            return session

    def _prune(self) -> None:
        now = time.monotonic()
        for sid in [s.sid for s in self._by_sid.values() if now - s.last_used > self.idle]:
            del self._by_sid[sid]

    def cookie_value(self, session: Session) -> str:
        return self._signer.sign(session.sid).decode()

    def find(self, cookie: str | None, *, touch: bool) -> Session | None:
        if not cookie:
            return None
        try:
            sid = self._signer.unsign(cookie).decode()
        except BadSignature:
            return None
        with self._lock:
            session = self._by_sid.get(sid)
            if session is None:
                return None
            now = time.monotonic()
            if now - session.last_used > self.idle:
                del self._by_sid[sid]
                return None
            if touch:
                session.last_used = now
            return session

    def end(self, session: Session) -> None:
        with self._lock:
            self._by_sid.pop(session.sid, None)

    def end_user(self, username: str) -> None:
        with self._lock:
            for sid in [s.sid for s in self._by_sid.values() if s.username == username]:
                del self._by_sid[sid]


def csrf_ok(session: Session | None, token: Any) -> bool:
    return session is not None and isinstance(token, str) and hmac.compare_digest(session.csrf, token)


class RateLimit:
    """At most `per_minute` attempts per key (the client address) in any 60 seconds."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return False
            hits.append(now)
            if len(self._hits) > 100_000:
                self._hits = {k: v for k, v in self._hits.items() if v and now - v[-1] <= 60}
            return True


class SecurityHeaders:
    """Adds the security headers to every response; pages (everything but /static) are never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode().lower() not in HEADERS and k.decode().lower() != "cache-control"]
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                headers.append((b"cache-control", b"public, max-age=300" if static else b"no-store"))
                if not static:
                    headers.append((b"pragma", b"no-cache"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)
