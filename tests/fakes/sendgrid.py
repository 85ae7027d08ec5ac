"""A fake SendGrid v3 Mail Send API: `POST /v3/mail/send` (research: email_providers.md §3).

Validation messages are the ones in SendGrid's "Status Codes & Errors for SendGrid Mail API"
page (sendgrid/docs `source/API_Reference/Web_API_v3/Mail/errors.md`).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from typing import Any

from aiohttp import web

from tests.fakes.base import Body, FakeServer, Recorded, bearer_token, make_response

HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."
AUTH_INVALID = "The provided authorization grant is invalid, expired, or revoked"
RESERVED_HEADERS = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}
_EMAIL_RE = re.compile(r"^[^\s@<>\"]+@[^\s@<>\"]+\.[^\s@<>\"]+$")

PERSONALIZATION_LIMIT = 1000

_MESSAGES = {
    "personalizations": "You must have at least one personalization.",
    "personalizations.limit": (
        "The personalization block is limited to 1000 personalizations per API request. You "
        "have provided {n} personalizations. Please consider splitting this into multiple "
        "requests and resending your request."
    ),
    "personalizations.unique": (
        "Each unique email address in the personalizations array should only be included once. "
        "You have included email address more than once."
    ),
    "substitutions": "Substitutions must be an object of strings, at most 10000 bytes in all.",
    "personalizations.to": "The to parameter is required for all personalization objects.",
    "to.email": (
        "The to array must at least have an email parameter with a valid email address and it "
        'may also contain a name parameter. e.g. {"email": "example@example.com"} or '
        '{"email": "example@example.com", "name": "Example Recipient"}'
    ),
    "from": (
        "The from object must be provided for every email send. It is an object that requires "
        "the email parameter, but may also contain a name parameter. e.g. "
        '{"email": "example@example.com"} or '
        '{"email": "example@example.com", "name": "Example Recipient"}'
    ),
    "from.email": (
        "The from object must at least have an email parameter with a valid email address and "
        'may also contain a name parameter. e.g. {"email": "example@example.com"} or '
        '{"email": "example@example.com", "name": "Example Recipient"}'
    ),
    "subject": (
        "The subject is required. You can get around this requirement if you use a template "
        "with a subject defined or if every personalization has a subject defined."
    ),
    "subject.empty": "The subject of your email must be a string at least one character in length.",
    "content": (
        "Unless a valid template_id is provided, the content parameter is required. There must "
        "be at least one defined content block. We typically suggest both text/plain and "
        "text/html blocks are included, but only one block is required."
    ),
    "content.type": "Your content type must be a string with length of at least one character.",
    "content.value": "The content value must be a string at least one character in length.",
    "content.order": (
        "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in "
        "your email: text/plain needs to be first, followed by text/html, followed by any other "
        "content."
    ),
    "custom_args": "All values of custom arguments object must be strings",
    "custom_args.empty": "custom_args cannot be empty.",
    "headers": "The header values must be strings.",
    "headers.reserved": "Header can not be one of the reserved keys.",
}

_STATUS_DEFAULTS = {
    400: ("Bad Request", None),
    401: (AUTH_INVALID, None),
    403: ("access forbidden", None),
    404: ("not found", None),
    405: ("method not allowed", None),
    413: ("The JSON payload you have included in your request is too large.", None),
    415: ("Invalid UTF8 in request", None),
    429: ("too many requests", None),
    500: ("An error occurred on a SendGrid server.", None),
    503: ("The SendGrid v3 Web API is not available.", None),
}


def message_id() -> str:
    """22 url-safe base64 characters, like `JQtrNr0IRR-slAi2eCUMSg`."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")


class FakeSendGrid(FakeServer):
    """`POST /v3/mail/send`: 202 + X-Message-Id, 200 (not queued) in sandbox mode.

    `sent` holds accepted (queued) request bodies and `message_ids[i]` the X-Message-Id of
    `sent[i]`.
    """

    RATE_LIMIT = 600

    def __init__(self, api_key: str = "SG.test-key", *, tls: bool = False) -> None:
        super().__init__(tls=tls)
        self.api_key = api_key
        self.sent: list[dict[str, Any]] = []
        self.message_ids: list[str] = []
        # addresses SendGrid refuses as if they were malformed (the database accepted them)
        self.invalid_recipients: set[str] = set()

    # --- realistic bodies --------------------------------------------------------------------

    @staticmethod
    def error(
        message: str, field: str | None = None, help: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        """`{"errors": [{"message", "field", "help"}]}`."""
        return {"errors": [{"message": message, "field": field, "help": help, **extra}]}

    def error_body(self, status: int) -> tuple[Body, dict[str, str]]:
        message, field = _STATUS_DEFAULTS.get(status, ("internal error", None))
        if status == 429:
            return {"errors": [{"field": None, "message": message}]}, self._limit_headers(1)
        return self.error(message, field), {}

    def _limit_headers(self, reset_in: int) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.RATE_LIMIT),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(int(time.time()) + reset_in),
        }

    def rate_limit_next(self, n: int, reset_in: int = 1) -> None:
        """429 `too many requests` with X-RateLimit-Limit/Remaining/Reset (epoch seconds)."""
        self.fail_next(
            n,
            status=429,
            body={"errors": [{"field": None, "message": "too many requests"}]},
            headers=self._limit_headers(reset_in),
        )

    # --- routes ------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v3/mail/send", self._route(self._send))

    async def _unknown_route(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v3/mail/send":
            return make_response(405, self.error("method not allowed"))
        return make_response(404, self.error("not found"))

    async def _send(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if bearer_token(rec) != self.api_key:
            return make_response(401, self.error(AUTH_INVALID))
        try:
            rec.body.decode("utf-8")
        except UnicodeDecodeError:
            return make_response(415, self.error("Invalid UTF8 in request"))
        if not isinstance(rec.json, dict):
            return make_response(400, self.error("Bad Request"))
        bad_recipients = self._bad_recipients(rec.json)
        if bad_recipients:  # every personalization with a bad address, each its own error
            errors = [
                {
                    "message": _MESSAGES["to.email"],
                    "field": field,
                    "help": HELP + "personalizations.to",
                }
                for field in bad_recipients
            ]
            return make_response(400, {"errors": errors})
        problem = self._validate(rec.json)
        if problem is not None:
            key, field = problem
            help_anchor = key.split(".")[0] if key != "to.email" else "personalizations.to"
            count = len(rec.json.get("personalizations") or [])
            message = _MESSAGES[key].replace("{n}", str(count))
            return make_response(400, self.error(message, field, HELP + help_anchor))
        mid = message_id()
        sandbox = (rec.json.get("mail_settings") or {}).get("sandbox_mode") or {}
        if sandbox.get("enable") is True:
            return web.Response(status=200, headers={"X-Message-Id": mid})
        self.sent.append(rec.json)
        self.message_ids.append(mid)
        return web.Response(status=202, headers={"X-Message-Id": mid})

    def emails(self) -> list[dict[str, Any]]:
        """Every accepted email as its recipient gets it: one per personalization, with that
        personalization's subject, headers and custom_args and its substitutions applied to the
        content and subject."""
        out = []
        for body in self.sent:
            for p in body["personalizations"]:
                subs = p.get("substitutions") or {}

                def apply(text: str | None, subs: dict[str, str] = subs) -> str | None:
                    for tag, value in subs.items():
                        text = text.replace(tag, value) if text is not None else None
                    return text

                content = {c["type"]: apply(c["value"]) for c in body.get("content") or []}
                for to in p["to"]:
                    out.append(
                        {
                            "to": to["email"],
                            "subject": apply(p.get("subject") or body.get("subject")),
                            "text": content.get("text/plain"),
                            "html": content.get("text/html"),
                            "headers": {**(body.get("headers") or {}), **(p.get("headers") or {})},
                            "custom_args": {
                                **(body.get("custom_args") or {}),
                                **(p.get("custom_args") or {}),
                            },
                            "categories": body.get("categories"),
                        }
                    )
        return out

    def _bad_recipients(self, body: dict[str, Any]) -> list[str]:
        """Fields of every `to` address that is not an email address."""
        pers = body.get("personalizations")
        fields = []
        for i, p in enumerate(pers if isinstance(pers, list) else []):
            for j, to in enumerate(p.get("to") or [] if isinstance(p, dict) else []):
                email = to.get("email") if isinstance(to, dict) else None
                if (
                    not isinstance(email, str)
                    or not _EMAIL_RE.match(email)
                    or email in self.invalid_recipients
                ):
                    fields.append(f"personalizations.{i}.to.{j}.email")
        return fields

    @staticmethod
    def _validate(body: dict[str, Any]) -> tuple[str, str | None] | None:
        """(message key, field) of the first problem, in the order SendGrid reports them."""
        pers = body.get("personalizations")
        if not isinstance(pers, list) or not pers:
            return "personalizations", "personalizations"
        if len(pers) > PERSONALIZATION_LIMIT:
            return "personalizations.limit", "personalizations"
        seen: set[str] = set()
        for i, p in enumerate(pers):
            for to in p.get("to") or [] if isinstance(p, dict) else []:
                email = to.get("email") if isinstance(to, dict) else None
                if isinstance(email, str):
                    if email.lower() in seen:
                        return "personalizations.unique", None
                    seen.add(email.lower())
            subs = p.get("substitutions") if isinstance(p, dict) else None
            if subs is not None and (
                not isinstance(subs, dict)
                or not all(isinstance(v, str) for v in subs.values())
                or len(json.dumps(subs).encode()) > 10_000
            ):
                return "substitutions", f"personalizations.{i}.substitutions"
        for i, p in enumerate(pers):
            if not isinstance(p, dict) or not isinstance(p.get("to"), list) or not p["to"]:
                return "personalizations.to", f"personalizations.{i}.to"
            for j, to in enumerate(p["to"]):
                email = to.get("email") if isinstance(to, dict) else None
                if not isinstance(email, str) or not _EMAIL_RE.match(email):
                    return "to.email", f"personalizations.{i}.to.{j}.email"
        sender = body.get("from")
        if not isinstance(sender, dict):
            return "from", "from"
        if not isinstance(sender.get("email"), str) or not _EMAIL_RE.match(sender["email"]):
            return "from.email", "from.email"
        subject = body.get("subject")
        if subject is not None and (not isinstance(subject, str) or not subject):
            return "subject.empty", "subject"
        per_subject = all(isinstance(p.get("subject"), str) and p["subject"] for p in pers)
        if not subject and not body.get("template_id") and not per_subject:
            return "subject", "subject"
        content = body.get("content")
        if content is None and not body.get("template_id"):
            return "content", "content"
        if content is not None:
            if not isinstance(content, list) or not content:
                return "content", "content"
            types: list[str] = []
            for i, block in enumerate(content):
                if not isinstance(block, dict):
                    return "content", f"content.{i}"
                if not isinstance(block.get("type"), str) or not block["type"]:
                    return "content.type", f"content.{i}.type"
                if not isinstance(block.get("value"), str) or not block["value"]:
                    return "content.value", f"content.{i}.value"
                types.append(block["type"].lower())
            expected = [t for t in ("text/plain", "text/html") if t in types]
            if types[: len(expected)] != expected:
                return "content.order", "content.0.type"
        for where, args in [("custom_args", body.get("custom_args"))] + [
            (f"personalizations.{i}.custom_args", p.get("custom_args")) for i, p in enumerate(pers)
        ]:
            if args is None:
                continue
            if not isinstance(args, dict) or not args:
                return "custom_args.empty", where
            if not all(isinstance(v, str) for v in args.values()):
                return "custom_args", where
        for where, headers in [("headers", body.get("headers"))] + [
            (f"personalizations.{i}.headers", p.get("headers")) for i, p in enumerate(pers)
        ]:
            if headers is None:
                continue
            if not isinstance(headers, dict) or not all(
                isinstance(v, str) for v in headers.values()
            ):
                return "headers", where
            if any(k.lower() in RESERVED_HEADERS for k in headers):
                return "headers.reserved", where
        return None
