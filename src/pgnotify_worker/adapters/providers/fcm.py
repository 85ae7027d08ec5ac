"""Push through FCM HTTP v1: projects/{id}/messages:send with a service-account OAuth token, from
a key file or from the metadata server (GKE Workload Identity: no key at all)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr

from pgnotify_worker.adapters.providers import http
from pgnotify_worker.adapters.providers.google_auth import (
    METADATA_HOST,
    CachedToken,
    MetadataTokenSource,
    ServiceAccount,
    TokenSource,
)
from pgnotify_worker.adapters.providers.spec import Context, ProviderSettings, ProviderSpec, reveal
from pgnotify_worker.core.classify import RETRYABLE_STATUS, classify_http, retry_after_from
from pgnotify_worker.errors import ProviderConfigError, TokenError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage, Retryable, Sent
from pgnotify_worker.ports import Provider

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
RESERVED_DATA_KEYS = ("from", "message_type", "notification")
RESERVED_DATA_PREFIXES = ("google.", "gcm.")


def fcm_data(payload: dict[str, Any]) -> dict[str, str]:
    """FCM data must be string -> string, without reserved keys."""
    data = {}
    for key, value in payload.items():
        if key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES):
            continue
        data[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return data


def fcm_error(body: dict[str, Any]) -> tuple[str | None, str]:
    """(FcmError errorCode or the status, message) from a google.rpc.Status body."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(error, dict)
    code = None
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            code = detail.get("errorCode")
    if code is None and isinstance(error.get("status"), str):
        code = error["status"] if error["status"] == "INVALID_ARGUMENT" else None
    return code, str(error.get("message", ""))[:300]


class FcmProvider(http.HttpProvider):
    """https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send"""

    name = "fcm"

    def __init__(
        self,
        service_account: str | None,
        *,
        credentials: Literal["key", "metadata"] = "key",
        project_id: str | None = None,
        metadata_host: str = METADATA_HOST,
        base_url: str = "https://fcm.googleapis.com",
        timeout: float = 15.0,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.tokens: CachedToken
        if credentials == "metadata":
            if not project_id:
                raise ProviderConfigError(
                    "fcm: PGNOTIFY_FCM_CREDENTIALS=metadata needs PGNOTIFY_FCM_PROJECT_ID (the "
                    "Firebase project to send through)"
                )
            self.tokens = MetadataTokenSource(metadata_host)
        else:
            if not service_account:
                raise ProviderConfigError(
                    "fcm: PGNOTIFY_FCM_SERVICE_ACCOUNT is not set (or set "
                    "PGNOTIFY_FCM_CREDENTIALS=metadata on GKE Workload Identity / GCE)"
                )
            account = ServiceAccount.load(service_account)
            self.tokens = TokenSource(account)
            project_id = project_id or account.project_id
        self.credentials = credentials
        self.project_id = project_id
        self.url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        super().__init__(timeout, now)

    async def close(self) -> None:
        await self.tokens.close()
        await super().close()

    def describe(self) -> dict[str, Any]:
        """For /status: where its tokens come from, nothing secret."""
        return {"credentials": self.credentials, "project_id": self.project_id}

    def handles(self, recipient: str) -> bool:
        """FCM registration tokens; browser subscriptions (JSON) go to webpush."""
        return not recipient.startswith("{")

    def body(self, message: RenderedMessage) -> dict[str, Any]:
        """{"message": {...}} for one device token."""
        body: dict[str, Any] = {"token": message.recipient}
        notification = {
            key: value
            for key, value in (("title", message.subject), ("body", message.text))
            if value
        }
        if notification:
            body["notification"] = notification
        data = fcm_data(message.data)
        if data:
            body["data"] = data
        return {"message": body}

    async def _post(self, data: bytes, token: str) -> http.HttpAnswer:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        return await self.call("POST", self.url, data=data, headers=headers)

    async def send(self, message: RenderedMessage) -> Outcome:
        data = json.dumps(self.body(message)).encode()
        try:
            token = await self.tokens.get(self.session)
            answer = await self._post(data, token)
            if answer.status == 401 and fcm_error(http.json_body(answer))[0] is None:
                # an expired or revoked access token: renew once, then try again
                token = await self.tokens.get(self.session, stale=token)
                answer = await self._post(data, token)
        except TokenError as exc:
            return Retryable("fcm_token", f"fcm: {exc}", None, trip=exc.refused)
        except http.TRANSPORT_ERRORS as exc:
            return http.transport_outcome(exc, "fcm")
        found = http.json_body(answer)
        if answer.status == 200 and isinstance(found.get("name"), str):
            return Sent(found["name"])
        code, text = fcm_error(found)
        return classify_fcm(answer.status, code, text, answer.headers, self.now())


# --- how its answers are classified ---------------------------------------------------------

FCM_DEAD_TOKEN = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})


def classify_fcm(
    status: int, error_code: str | None, message: str, headers: Mapping[str, str], now: dt.datetime
) -> Outcome:
    """FCM v1 FcmError codes (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode)."""
    what = f"fcm {error_code or status}"
    if error_code in FCM_DEAD_TOKEN or (status == 404 and error_code is None):
        return Permanent(
            f"fcm_{error_code or 'not_found'}", f"{what}: token no longer valid", deactivate=True
        )
    if error_code == "INVALID_ARGUMENT" or status == 400:
        dead = "registration token" in message.lower() and "not a valid" in message.lower()
        return Permanent("fcm_INVALID_ARGUMENT", f"{what}: {message}", deactivate=dead)
    if error_code in ("THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR") or status in (401, 403):
        return Retryable(f"fcm_{error_code or status}", f"{what}: {message}", None, trip=True)
    if error_code == "QUOTA_EXCEEDED" or status == 429:
        wait = retry_after_from(headers, now) or 60.0  # FCM: at least a minute for quota errors
        return Retryable("fcm_QUOTA_EXCEEDED", what, wait, throttled=True)
    if status >= 500 or status in RETRYABLE_STATUS:
        return classify_http(status, headers, now, what="fcm")
    return Permanent(f"fcm_{error_code or status}", f"{what}: {message}")


# --- settings and construction (read by the registry and the settings table) -------------------


class FcmSettings(ProviderSettings):
    """fcm settings (PGNOTIFY_FCM_*)."""

    fcm_service_account: SecretStr | None = Field(
        None, description="FCM service-account key: the JSON itself, or the path of the JSON file."
    )
    fcm_credentials: Literal["key", "metadata"] = Field(
        "key",
        description="Where FCM's OAuth tokens come from: key (PGNOTIFY_FCM_SERVICE_ACCOUNT) or "
        "metadata (the GCE/GKE metadata server: Workload Identity, no key file; needs "
        "PGNOTIFY_FCM_PROJECT_ID and egress to it, see deploy/overlays/gke-workload-identity).",
    )
    fcm_project_id: str | None = Field(
        None,
        description="Firebase project to send through; required with credentials=metadata "
        "(default: the key's project_id).",
    )
    fcm_metadata_host: str = Field(
        METADATA_HOST,
        description="Metadata server host[:port] for credentials=metadata "
        "(metadata.google.internal by address).",
    )
    fcm_base_url: str = Field("https://fcm.googleapis.com", description="FCM API base URL.")


def _build(cfg: FcmSettings, ctx: Context) -> Provider:
    return FcmProvider(
        reveal(cfg.fcm_service_account),
        credentials=cfg.fcm_credentials,
        project_id=cfg.fcm_project_id,
        metadata_host=cfg.fcm_metadata_host,
        base_url=cfg.fcm_base_url,
        timeout=ctx.settings.provider_timeout,
    )


# FCM allows 600,000 per minute per project.
SPECS = (ProviderSpec("fcm", frozenset({"push"}), FcmSettings, _build, default_rate="500/500"),)
