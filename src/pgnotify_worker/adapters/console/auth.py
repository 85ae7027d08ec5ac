"""Console logins without a server-side store: password checks (plain, argon2, bcrypt), signed
session cookies carrying role and expiry, CSRF tokens bound to the session, and a login rate
limit per client address and overall."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pgnotify_worker.errors import ConfigError

Role = Literal["admin", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "viewer")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Password:
    """One configured password: plain text, or an argon2 / bcrypt hash."""

    setting: str
    value: str

    @property
    def kind(self) -> Literal["plain", "argon2", "bcrypt"]:
        if self.value.startswith("$argon2"):
            return "argon2"
        if self.value.startswith(("$2a$", "$2b$", "$2y$")):
            return "bcrypt"
        return "plain"

    def check_available(self) -> None:
        """Fail at start-up, naming the setting, when a hash is given without its library."""
        module = {"argon2": "argon2", "bcrypt": "bcrypt"}.get(self.kind)
        if module is None:
            return
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"{self.setting} holds a {self.kind} hash but the {self.kind} library is not "
                "installed: pip install 'pgnotify-worker[console]' (or give a plain password)"
            ) from None

    def verify(self, given: str) -> bool:
        """Constant-time for plain passwords (digests compared, so length leaks nothing); the
        hash libraries compare in constant time themselves. Slow for hashes: run in a thread."""
        given_bytes = given.encode("utf-8", "surrogateescape")
        if self.kind == "plain":
            expected = hashlib.sha256(self.value.encode("utf-8", "surrogateescape")).digest()
            return hmac.compare_digest(hashlib.sha256(given_bytes).digest(), expected)
        if self.kind == "bcrypt":
            import bcrypt  # noqa: PLC0415 - optional (the console extra)

            try:
                return bool(bcrypt.checkpw(given_bytes, self.value.encode()))
            except ValueError:
                return False
        import argon2  # noqa: PLC0415 - optional (the console extra)

        try:
            return bool(argon2.PasswordHasher().verify(self.value, given))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False


def session_key(passwords: list[Password], secret: str | None) -> bytes:
    """The signing key: from the optional secret and every password, so changing a password
    ends every session (and replicas with the same settings accept each other's cookies)."""
    material = b"\0".join(
        f"{p.setting}={p.value}".encode("utf-8", "surrogateescape") for p in passwords
    )
    return hmac.new(
        (secret or "").encode("utf-8", "surrogateescape"),
        b"pgnotify-console-session\0" + material,
        hashlib.sha256,
    ).digest()


@dataclass(frozen=True)
class Session:
    role: Role
    expires: int
    nonce: str


class Sessions:
    """Signed cookies `<payload>.<mac>` (HMAC-SHA256) and CSRF tokens derived from them."""

    def __init__(self, key: bytes, lifetime: float) -> None:
        self.key = key
        self.lifetime = lifetime

    def _mac(self, purpose: str, data: str) -> str:
        return _b64(hmac.new(self.key, f"{purpose}\0{data}".encode(), hashlib.sha256).digest())

    def issue(self, role: Role, now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        session = Session(role, int(now + self.lifetime), _b64(os.urandom(18)))
        payload = _b64(
            json.dumps({"r": session.role, "e": session.expires, "n": session.nonce}).encode()
        )
        return f"{payload}.{self._mac('session', payload)}", session

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie proves, or None (missing, forged, expired, unknown role)."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 512:
            return None
        payload, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload).encode()):
            return None
        try:
            data = json.loads(_unb64(payload))
            role, expires, nonce = data["r"], int(data["e"]), str(data["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if role not in ROLES or expires <= (time.time() if now is None else now):
            return None
        return Session(role, expires, nonce)

    def csrf(self, nonce: str) -> str:
        """The CSRF token of a session (or of a login form's pre-session nonce)."""
        return self._mac("csrf", nonce)

    def csrf_ok(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf(nonce).encode())


class LoginLimiter:
    """Sliding windows of login attempts: per client address and for everyone together (a
    spread-out guess still meets the global limit)."""

    def __init__(
        self,
        per_client: int = 10,
        overall: int = 100,
        window: float = 300.0,
        max_clients: int = 10_000,
    ) -> None:
        self.per_client = per_client
        self.overall = overall
        self.window = window
        self.max_clients = max_clients
        self._clients: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()

    def _prune(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """0 when an attempt may be made now, else seconds to wait."""
        now = time.monotonic() if now is None else now
        self._prune(self._all, now)
        q = self._clients.get(client)
        if q is not None:
            self._prune(q, now)
        waits = [0.0]
        if len(self._all) >= self.overall:
            waits.append(self._all[0] + self.window - now)
        if q is not None and len(q) >= self.per_client:
            waits.append(q[0] + self.window - now)
        return max(waits)

    def record(self, client: str, now: float | None = None) -> None:
        """Count a failed attempt."""
        now = time.monotonic() if now is None else now
        if client not in self._clients and len(self._clients) >= self.max_clients:
            for name in [
                n for n, q in self._clients.items() if not q or q[-1] <= now - self.window
            ]:
                del self._clients[name]
        self._clients.setdefault(client, deque()).append(now)
        self._all.append(now)
