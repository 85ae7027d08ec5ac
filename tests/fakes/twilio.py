"""A fake Twilio Programmable Messaging API (research: sms_push_providers.md §1-2).

`POST /2010-04-01/Accounts/{AccountSid}/Messages.json` (form-encoded, HTTP Basic auth) and
`GET .../Messages/{Sid}.json`; plus the X-Twilio-Signature algorithm and a status-callback
sender for testing the inbound side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

from tests.fakes.base import Body, FakeServer, Recorded, make_response

API = "/2010-04-01"

#: sync error code -> (HTTP status, message template); {to}/{from_} are filled in
ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource {path} was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "Internal Server Error"),
    20503: (503, "Service Unavailable"),
    21211: (400, "The 'To' number {to} is not a valid phone number."),
    21212: (
        400,
        "The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric "
        "sender ID.",
    ),
    21408: (
        400,
        "Permission to send an SMS has not been enabled for the region indicated by the 'To' "
        "number: {to}.",
    ),
    21602: (400, "Message body is required."),
    21603: (400, "A 'From' phone number is required."),
    21604: (400, "A 'To' phone number is required."),
    21606: (
        400,
        "The 'From' phone number provided ({from_}) is not a valid message-capable Twilio phone "
        "number for this destination.",
    ),
    21608: (
        400,
        "The number {to} is unverified. Trial accounts cannot send messages to unverified "
        "numbers; verify {to} at twilio.com/user/account/phone-numbers/verified, or purchase a "
        "Twilio number to send messages to unverified numbers",
    ),
    21609: (400, "The StatusCallback URL {url} is not a valid URL."),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21612: (
        400,
        "The 'To' phone number: {to}, is not currently reachable using the 'From' phone "
        "number: {from_} via SMS.",
    ),
    21614: (400, "'To' number {to} is not a valid mobile number"),
    21617: (400, "The concatenated message body exceeds the 1600 character limit."),
    21635: (400, "'To' number cannot be a landline"),
}

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_CHANNEL = re.compile(r"^(?:[a-z]+:)?")
_ALPHA_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_SHORT_CODE = re.compile(r"^\d{3,8}$")
_GSM7 = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ ÆæßÉ!\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXT = set("^{}\\[~]|€\f")


def status_for_code(code: int) -> int:
    """HTTP status Twilio uses with a sync error code: 2xxxx REST codes carry the status in
    their last three digits (20429 -> 429); the 21xxx message errors are 400."""
    if code in ERRORS:
        return ERRORS[code][0]
    if 20000 <= code < 21000 and 400 <= code - 20000 < 600:
        return code - 20000
    return 400


def num_segments(body: str) -> int:
    """SMS segments: GSM-7 160/153 septets, otherwise UCS-2 70/67 code units."""
    if not body:
        return 1
    if all(c in _GSM7 or c in _GSM7_EXT for c in body):
        units = sum(2 if c in _GSM7_EXT else 1 for c in body)
        return 1 if units <= 160 else math.ceil(units / 153)
    units = len(body.encode("utf-16-le")) // 2
    return 1 if units <= 70 else math.ceil(units / 67)


def _valid_address(value: str, *, sender: bool) -> bool:
    bare = _CHANNEL.sub("", value, count=1)
    if _E164.match(bare):
        return True
    return sender and bool(_ALPHA_SENDER.match(bare) or _SHORT_CODE.match(bare))


def twilio_signature(
    auth_token: str, url: str, params: Mapping[str, str | Sequence[str]] | None = None
) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(auth_token, url + name1 + value1 + ...)) with the
    names sorted; a repeated name contributes its values sorted and de-duplicated (as
    twilio-python 9.x does). Pass `{}` for JSON-body webhooks (`...&bodySHA256=<hex>` URLs)."""
    data = url
    for name in sorted(params or {}):
        value = (params or {})[name]
        values = [value] if isinstance(value, str) else sorted(set(value))
        for v in values:
            data += name + v
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


async def post_status_callback(
    url: str,
    auth_token: str,
    params: Mapping[str, str],
    *,
    idempotency_token: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, str]:
    """POST a form-encoded status callback signed like Twilio does; returns (status, body)."""
    headers = {
        "X-Twilio-Signature": twilio_signature(auth_token, url, params),
        "I-Twilio-Idempotency-Token": idempotency_token or str(uuid.uuid4()),
        "User-Agent": "TwilioProxy/1.1",
        "Accept": "*/*",
    }
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(url, data=dict(params), headers=headers) as response,
    ):
        return response.status, await response.text()


def basic_auth(login: str, password: str) -> str:
    """An `Authorization: Basic ...` header value."""
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def basic_credentials(value: str | None) -> tuple[str, str] | None:
    """(login, password) of a Basic `Authorization` header value, or None."""
    scheme, _, encoded = (value or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    login, sep, password = decoded.partition(":")
    return (login, password) if sep else None


def _now_rfc2822() -> str:
    return format_datetime(datetime.now(UTC).replace(microsecond=0))


class FakeTwilio(FakeServer):
    """The Messages resource of the 2010-04-01 API.

    - `sent`: the message resources (dicts, as returned) of accepted messages, in order.
    - `error_for_number`: To number -> Twilio error code. Codes < 30000 are returned
      synchronously (21xxx -> 400, 20429 -> 429, 20500 -> 500, ...); 30xxx codes are accepted
      and become the `ErrorCode` of `send_status_callback()` (an async delivery failure).
    - `api_keys`: optional API key SID -> secret, also accepted as Basic credentials.
    """

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "test-auth-token",
        *,
        api_keys: Mapping[str, str] | None = None,
        tls: bool = False,
    ) -> None:
        super().__init__(tls=tls)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_keys = dict(api_keys or {})
        self.error_for_number: dict[str, int] = {}
        self.sent: list[dict[str, Any]] = []
        self.messages: dict[str, dict[str, Any]] = {}  # sid -> resource (updated by callbacks)
        self.status_callbacks: dict[str, str] = {}  # sid -> StatusCallback URL

    @property
    def messages_path(self) -> str:
        return f"{API}/Accounts/{self.account_sid}/Messages.json"

    # --- realistic bodies --------------------------------------------------------------------

    @staticmethod
    def error(code: int, message: str | None = None, status: int | None = None) -> dict[str, Any]:
        """`{"code", "message", "more_info", "status"}`."""
        return {
            "code": code,
            "message": message or ERRORS.get(code, (0, f"Error {code}"))[1],
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status or status_for_code(code),
        }

    def error_body(self, status: int) -> tuple[Body, dict[str, str]]:
        code = 20000 + status if 400 <= status < 600 else 20500
        message = ERRORS.get(code, (status, f"HTTP {status}"))[1]
        return self.error(code, message, status), {}

    def _fail(self, code: int, **fmt: str) -> web.Response:
        status, template = ERRORS.get(code, (status_for_code(code), f"Error {code}"))
        values = {"to": "", "from_": "", "url": "", "path": ""} | fmt
        return make_response(status, self.error(code, template.format(**values), status))

    # --- routes ------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        app.router.add_post(f"{API}/Accounts/{{account}}/Messages.json", self._route(self._send))
        app.router.add_get(
            f"{API}/Accounts/{{account}}/Messages/{{sid}}.json", self._route(self._fetch)
        )

    async def _unknown_route(self, request: web.Request) -> web.StreamResponse:
        return self._fail(20404, path=request.path)

    def _authorized(self, rec: Recorded) -> bool:
        credentials = basic_credentials(rec.header("authorization"))
        if credentials is None:
            return False
        login, password = credentials
        expected = self.auth_token if login == self.account_sid else self.api_keys.get(login)
        return expected is not None and hmac.compare_digest(password, expected)

    async def _fetch(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if not self._authorized(rec):
            return self._fail(20003)
        message = self.messages.get(request.match_info["sid"])
        if request.match_info["account"] != self.account_sid or message is None:
            return self._fail(20404, path=request.path)
        return make_response(200, message)

    async def _send(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if not self._authorized(rec):
            return self._fail(20003)
        if request.match_info["account"] != self.account_sid:
            return self._fail(20404, path=request.path)
        form: dict[str, list[str]] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = parse_qs(rec.body.decode("utf-8", "replace"), keep_blank_values=True)

        def one(name: str) -> str:
            return form.get(name, [""])[-1]

        to, from_, service = one("To"), one("From"), one("MessagingServiceSid")
        body, media = one("Body"), [m for m in form.get("MediaUrl", []) if m]
        callback = one("StatusCallback")
        if not to:
            return self._fail(21604)
        if not from_ and not service:
            return self._fail(21603)
        if not body and not media and not one("ContentSid"):
            return self._fail(21602)
        if not _valid_address(to, sender=False):
            return self._fail(21211, to=to)
        if from_ and not _valid_address(from_, sender=True):
            return self._fail(21212, from_=from_)
        if len(body) > 1600:
            return self._fail(21617)
        if callback:
            parts = urlsplit(callback)
            if parts.scheme not in ("http", "https") or not parts.hostname or "_" in parts.hostname:
                return self._fail(21609, url=callback)
        code = self.error_for_number.get(to)
        if code is not None and code < 30000:
            return self._fail(code, to=to, from_=from_ or service)

        sid = ("MM" if media else "SM") + secrets.token_hex(16)
        now = _now_rfc2822()
        path = f"{API}/Accounts/{self.account_sid}/Messages/{sid}"
        resource: dict[str, Any] = {
            "sid": sid,
            "date_created": now,
            "date_updated": now,
            "date_sent": None,
            "account_sid": self.account_sid,
            "to": to,
            "from": from_ or None,
            "messaging_service_sid": service or None,
            "body": body,
            "status": "accepted" if service else "queued",
            "num_segments": "0" if service else str(num_segments(body)),
            "num_media": str(len(media)),
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "price": None,
            "price_unit": "USD",
            "error_code": None,
            "error_message": None,
            "uri": f"{path}.json",
            "subresource_uris": {"media": f"{path}/Media.json"},
        }
        self.sent.append(resource)
        self.messages[sid] = resource
        if callback:
            self.status_callbacks[sid] = callback
        return make_response(201, resource)

    # --- status callbacks (Twilio -> app) ----------------------------------------------------

    def status_callback_params(
        self, sid: str, status: str, error_code: int | None = None
    ) -> dict[str, str]:
        """The form Twilio posts for a status change of message `sid`."""
        message = self.messages[sid]
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "From": message["from"] or "",
            "MessageSid": sid,
            "MessageStatus": status,
            "SmsSid": sid,
            "SmsStatus": status,
            "To": message["to"],
        }
        if message["messaging_service_sid"]:
            params["MessagingServiceSid"] = message["messaging_service_sid"]
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        return params

    async def send_status_callback(
        self,
        sid: str,
        status: str | None = None,
        *,
        error_code: int | None = None,
        url: str | None = None,
    ) -> tuple[int, str]:
        """Post a signed status callback for message `sid` to its StatusCallback (or `url`).

        Without `status`: "undelivered" with the 30xxx code from `error_for_number` for its To
        number, else "delivered". Returns the receiver's (status, body)."""
        message = self.messages[sid]
        if status is None:
            code = self.error_for_number.get(message["to"])
            if code is not None and code >= 30000:
                status, error_code = "undelivered", code
            else:
                status = "delivered"
        target = url or self.status_callbacks.get(sid)
        if not target:
            raise ValueError(f"message {sid} has no StatusCallback; pass url=")
        message.update(status=status, error_code=error_code, date_updated=_now_rfc2822())
        params = self.status_callback_params(sid, status, error_code)
        return await post_status_callback(target, self.auth_token, params)
