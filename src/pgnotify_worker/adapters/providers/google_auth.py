"""OAuth2 access tokens for a Google service account, cached: from a key file (JWT bearer grant,
RFC 7523), or from the GCE/GKE metadata server (Application Default Credentials without a key:
GKE Workload Identity)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:  # imported where used: cryptography costs ~7 MB of RSS in every worker
    from cryptography.hazmat.primitives.asymmetric import rsa

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.errors import ProviderConfigError, TokenError

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL: Google's aud
REFRESH_MARGIN = 300.0  # renew this long before the token expires
METADATA_HOST = "169.254.169.254"  # metadata.google.internal, without a name lookup
METADATA_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"  # noqa: S105
METADATA_REFRESH_MARGIN = 60.0  # the metadata server renews its token itself, near the end


@dataclass(frozen=True)
class ServiceAccount:
    """The fields of a service-account key file that the grant needs."""

    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str
    token_uri: str
    project_id: str

    @classmethod
    def load(cls, value: str) -> ServiceAccount:
        """From the JSON text itself, or from the path of the JSON file."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

        text = value.strip()
        if not text.startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as exc:
                raise ProviderConfigError(
                    f"fcm: cannot read PGNOTIFY_FCM_SERVICE_ACCOUNT file: {exc.strerror}"
                ) from None
        try:
            info: dict[str, Any] = json.loads(text)
            key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
            account = cls(
                client_email=info["client_email"],
                private_key=key,  # type: ignore[arg-type]
                private_key_id=info.get("private_key_id", ""),
                token_uri=info.get("token_uri") or GOOGLE_TOKEN_AUDIENCE,
                project_id=info["project_id"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderConfigError(
                "fcm: PGNOTIFY_FCM_SERVICE_ACCOUNT is not a service-account key "
                f"({type(exc).__name__})"
            ) from None
        if not isinstance(account.private_key, rsa.RSAPrivateKey):
            raise ProviderConfigError("fcm: the service-account key is not an RSA key")
        return account


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def assertion(account: ServiceAccount, now: float, scope: str = SCOPE) -> str:
    """The signed JWT (RS256) of the grant: one hour at most, as Google requires."""
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    header = {"alg": "RS256", "typ": "JWT", "kid": account.private_key_id}
    claims = {
        "iss": account.client_email,
        "scope": scope,
        "aud": GOOGLE_TOKEN_AUDIENCE,
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = account.private_key.sign(
        signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signing_input}.{_b64(signature)}"


class CachedToken:
    """One cached access token, renewed before it expires; concurrent callers share a refresh.
    Subclasses fetch it (`_fetch`)."""

    margin = REFRESH_MARGIN

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self, session: aiohttp.ClientSession, *, stale: str | None = None) -> str:
        """A valid token; `stale` names one the API just refused, forcing a refresh."""
        async with self._lock:
            fresh = self._token is not None and self.clock() < self._expires - self.margin
            if fresh and (stale is None or stale != self._token):
                assert self._token is not None
                return self._token
            if stale is not None and self._token is not None and stale != self._token:
                return self._token  # another caller has refreshed already
            self._token, lifetime = await self._fetch(session)
            self._expires = self.clock() + lifetime
            return self._token

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the source holds (the metadata source's own session)."""


class TokenSource(CachedToken):
    """Tokens for a service-account key: a signed JWT exchanged at the key's token_uri."""

    def __init__(self, account: ServiceAccount, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.account = account

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": assertion(self.account, self.clock()),
        }
        try:
            answer = await http.request(
                session,
                "POST",
                self.account.token_uri,
                data=form,
                proxy=http.env_proxy(self.account.token_uri),
            )
        except http.TRANSPORT_ERRORS as exc:
            raise TokenError(
                f"token endpoint unreachable ({type(exc).__name__})", refused=False
            ) from None
        body = http.json_body(answer)
        token = body.get("access_token")
        if answer.status == 200 and isinstance(token, str):
            expires = body.get("expires_in")
            return token, float(expires) if isinstance(expires, int | float) else 3600.0
        reason = f"{body.get('error', answer.status)}: {body.get('error_description', '')}"[:200]
        refused = 400 <= answer.status < 500 and answer.status not in (408, 429)
        raise TokenError(f"token endpoint said {reason}", refused=refused)


class MetadataTokenSource(CachedToken):
    """Tokens of the workload's own service account from the metadata server (GCE, or GKE's
    Workload Identity server at the same address): GET .../service-accounts/default/token with
    `Metadata-Flavor: Google`, answered {"access_token", "expires_in", "token_type"}. Asked
    directly on a session of its own: never through an egress proxy (HTTPS_PROXY), which could
    not reach the node-local server anyway."""

    margin = METADATA_REFRESH_MARGIN

    def __init__(
        self,
        host: str = METADATA_HOST,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.url = f"http://{host}{METADATA_TOKEN_PATH}"
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        if self._session is None:
            self._session = http.make_session(self.timeout, limit=2)  # direct: no trust_env
        try:
            answer = await http.request(
                self._session, "GET", self.url, headers={"Metadata-Flavor": "Google"}
            )
        except http.TRANSPORT_ERRORS as exc:
            # node-local: unreachable means not on GCE/GKE or a NetworkPolicy without the
            # gke-workload-identity overlay, not an outage to retry through: trip the circuit
            raise TokenError(
                f"metadata server {self.url} unreachable ({type(exc).__name__}): not on GCE/GKE, "
                "or egress to it is not allowed",
                refused=True,
            ) from None
        body = http.json_body(answer)
        token = body.get("access_token")
        if answer.status == 200 and isinstance(token, str):
            expires = body.get("expires_in")
            return token, float(expires) if isinstance(expires, int | float) else 300.0
        # 404: no service account bound (Workload Identity not set up for this KSA); 403: the
        # header was stripped. Both are configuration: the channel's circuit opens, as for a key.
        refused = 400 <= answer.status < 500 and answer.status not in (408, 429)
        raise TokenError(
            f"metadata server said {answer.status}: {answer.body[:200].decode(errors='replace')}",
            refused=refused,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
