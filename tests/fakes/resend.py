"""A fake Resend API: `POST /emails` (research: /work/research/email_providers.md §1)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from tests.fakes.base import Body, FakeServer, Recorded, bearer_token, make_response

#: messages of the documented error names (resend.com/docs/api-reference/errors)
ERROR_MESSAGES: dict[str, tuple[int, str]] = {
    "invalid_idempotency_key": (400, "The key must be between 1-256 chars."),
    "validation_error": (400, "We found an error with one or more fields in the request."),
    "missing_api_key": (401, "Missing API key in the authorization header."),
    "restricted_api_key": (401, "This API key is restricted to only send emails."),
    "invalid_api_key": (403, "API key is invalid."),
    "not_found": (404, "The requested endpoint does not exist."),
    "method_not_allowed": (405, "Method is not allowed for the requested path."),
    "invalid_idempotent_request": (
        409,
        "Same idempotency key used with a different request payload.",
    ),
    "concurrent_idempotent_requests": (
        409,
        "Same idempotency key used while original request is still in progress.",
    ),
    "invalid_attachment": (422, "Attachment must have either a `content` or `path`."),
    "invalid_from_address": (
        422,
        "Invalid `from` field. The email address needs to follow the `email@example.com` "
        "or `Name <email@example.com>` format.",
    ),
    "invalid_parameter": (422, "The parameter must be a valid UUID."),
    "missing_required_field": (422, "The request body is missing one or more required fields."),
    "monthly_quota_exceeded": (429, "You have reached your monthly email sending quota."),
    "daily_quota_exceeded": (429, "You have reached your daily email sending quota."),
    "rate_limit_exceeded": (
        429,
        "Too many requests. Please limit the number of requests per second.",
    ),
    "security_error": (451, "We may have found a security issue with the request."),
    "application_error": (500, "An unexpected error occurred."),
    "internal_server_error": (500, "An unexpected error occurred."),
}

_DEFAULT_NAME_FOR_STATUS = {
    400: "validation_error",
    401: "missing_api_key",
    403: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "invalid_idempotent_request",
    422: "missing_required_field",
    429: "rate_limit_exceeded",
    451: "security_error",
    500: "internal_server_error",
}

_EMAIL = r"[^\s@<>\"]+@[^\s@<>\"]+\.[^\s@<>\"]+"
_FROM_RE = re.compile(rf"^\s*(?:{_EMAIL}|[^<>]*<{_EMAIL}>)\s*$")


class FakeResend(FakeServer):
    """`POST /emails` and `POST /emails/batch` with Bearer auth, required User-Agent and
    Idempotency-Key semantics.

    `sent` holds the JSON bodies of accepted emails (an idempotent replay adds nothing; a batch
    adds each of its emails) and `sent_ids[i]` the id returned for `sent[i]`.

    The batch endpoint (resend.com/docs/api-reference/emails/send-batch-emails) takes up to 100
    emails; `x-batch-validation: permissive` sends the valid ones and reports the others in
    `errors` as {index, message}; strict (the default) refuses the whole batch for one bad email.
    A batch Idempotency-Key replays the first answer for the same body.
    """

    BATCH_LIMIT = 100

    RATE_LIMIT = 5  # ratelimit-limit on every answer (docs: 5 req/s per team; not a contract)

    def __init__(self, api_key: str = "re_test_123", *, tls: bool = False) -> None:
        super().__init__(tls=tls)
        self.api_key = api_key
        self.sent: list[dict[str, Any]] = []
        self.sent_ids: list[str] = []
        # Idempotency-Key -> (canonical body, email id); failed requests are not cached
        self.idempotency: dict[str, tuple[str, str]] = {}
        self._in_flight: set[str] = set()
        self._concurrent: set[int] = set()  # id() of requests that arrived while in flight
        # Idempotency-Key of a batch -> (canonical body, answer)
        self.batch_idempotency: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lose_answers = 0
        # addresses Resend refuses as if they were malformed (the database accepted them)
        self.invalid_recipients: set[str] = set()

    # --- realistic bodies --------------------------------------------------------------------

    @staticmethod
    def error(name: str, message: str | None = None, status: int | None = None) -> dict[str, Any]:
        """`{"statusCode", "name", "message"}` with the documented status/message for `name`."""
        default_status, default_message = ERROR_MESSAGES.get(
            name, (500, "An unexpected error occurred.")
        )
        return {
            "statusCode": status or default_status,
            "name": name,
            "message": message or default_message,
        }

    def error_body(self, status: int) -> tuple[Body, dict[str, str]]:
        name = _DEFAULT_NAME_FOR_STATUS.get(status, "application_error")
        headers = self._limit_headers(remaining=0 if status == 429 else None)
        if status == 429:
            headers["retry-after"] = "1"
        return self.error(name, status=status), headers

    def _limit_headers(self, remaining: int | None = None, reset: int = 1) -> dict[str, str]:
        left = self.RATE_LIMIT - 1 if remaining is None else remaining
        return {
            "ratelimit-limit": str(self.RATE_LIMIT),
            "ratelimit-remaining": str(left),
            "ratelimit-reset": str(reset),
        }

    def _fail(
        self, name: str, message: str | None = None, status: int | None = None
    ) -> web.Response:
        body = self.error(name, message, status)
        return make_response(body["statusCode"], body, self._limit_headers())

    # --- scripted failures -------------------------------------------------------------------

    def rate_limit_next(self, n: int, retry_after: int = 1) -> None:
        """429 `rate_limit_exceeded` with `retry-after` and `ratelimit-*` (reset as a delta)."""
        headers = self._limit_headers(remaining=0, reset=retry_after)
        headers["retry-after"] = str(retry_after)
        self.fail_next(n, status=429, body=self.error("rate_limit_exceeded"), headers=headers)

    def quota_exceeded_next(self, n: int, *, monthly: bool = False) -> None:
        """429 `daily_quota_exceeded` (or `monthly_quota_exceeded`)."""
        name = "monthly_quota_exceeded" if monthly else "daily_quota_exceeded"
        self.fail_next(n, status=429, body=self.error(name), headers=self._limit_headers())

    def lose_answers_next(self, n: int) -> None:
        """Process the next `n` batch requests as usual (the emails are sent and the key is
        recorded), then answer 500 as if the answer were lost on the way back."""
        self._lose_answers += n

    # --- routes ------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/emails", self._route(self._send))
        app.router.add_post("/emails/batch", self._route(self._send_batch))

    async def _send_batch(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if not rec.header("user-agent"):
            return web.Response(status=403, text="error code: 1010")
        if rec.header("authorization") is None or bearer_token(rec) is None:
            return self._fail("missing_api_key")
        if bearer_token(rec) != self.api_key:
            return self._fail("invalid_api_key")
        key = rec.header("idempotency-key")
        if key is not None and not 1 <= len(key) <= 256:
            return self._fail("invalid_idempotency_key")
        emails = rec.json
        if not isinstance(emails, list) or not emails:
            return self._fail("validation_error", "The body must be a non-empty array of emails.")
        if len(emails) > self.BATCH_LIMIT:
            return self._fail(
                "validation_error",
                f"The batch must contain at most {self.BATCH_LIMIT} emails.",
                422,
            )
        canonical = json.dumps(emails, sort_keys=True, separators=(",", ":"))
        if key is not None:
            if id(rec) in self._concurrent:
                return self._fail("concurrent_idempotent_requests")
            seen = self.batch_idempotency.get(key)
            if seen is not None:
                if seen[0] != canonical:
                    return self._fail("invalid_idempotent_request")
                return make_response(200, seen[1], self._limit_headers())
        permissive = (rec.header("x-batch-validation") or "strict").lower() == "permissive"
        problems: list[dict[str, Any]] = []
        for index, email in enumerate(emails):
            problem = (
                self._validate(email)
                if isinstance(email, dict)
                else ("validation_error", "Each email must be an object.")
            )
            if problem is None and isinstance(email, dict):
                if set(email["to"] if isinstance(email["to"], list) else [email["to"]]) & (
                    self.invalid_recipients
                ):
                    problem = ("validation_error", "Invalid `to` field.")
                for name in ("attachments", "scheduled_at"):
                    if name in email:
                        problem = ("validation_error", f"`{name}` is not supported in batches.")
            if problem is not None:
                message = problem[1] or ERROR_MESSAGES.get(problem[0], (422, ""))[1]
                if not permissive:
                    return self._fail(problem[0], f"Email {index}: {message}", 422)
                problems.append({"index": index, "message": message})
        bad = {p["index"] for p in problems}
        data = []
        for index, email in enumerate(emails):
            if index not in bad:
                email_id = str(uuid.uuid4())
                self.sent.append(email)
                self.sent_ids.append(email_id)
                data.append({"id": email_id})
        answer: dict[str, Any] = {"data": data}
        if permissive:
            answer["errors"] = problems
        if key is not None:
            self.batch_idempotency[key] = (canonical, answer)
        if self._lose_answers > 0:
            self._lose_answers -= 1
            return self._fail("internal_server_error")
        return make_response(200, answer, self._limit_headers())

    async def _unknown_route(self, request: web.Request) -> web.StreamResponse:
        if request.path in ("/emails", "/emails/batch"):
            return self._fail("method_not_allowed")
        return self._fail("not_found")

    async def _send(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        # Rejected in front of the API (Cloudflare "error code: 1010"); the body is not JSON.
        if not rec.header("user-agent"):
            return web.Response(status=403, text="error code: 1010")
        if rec.header("authorization") is None or bearer_token(rec) is None:
            return self._fail("missing_api_key")
        if bearer_token(rec) != self.api_key:
            return self._fail("invalid_api_key")
        key = rec.header("idempotency-key")
        if key is not None and not 1 <= len(key) <= 256:
            return self._fail("invalid_idempotency_key")
        if not isinstance(rec.json, dict):
            return self._fail("validation_error", "Invalid JSON body.")
        problem = self._validate(rec.json)
        if problem is not None:
            return self._fail(*problem)
        if key is None:
            return self._accept(rec.json)
        canonical = json.dumps(rec.json, sort_keys=True, separators=(",", ":"))
        if id(rec) in self._concurrent:
            return self._fail("concurrent_idempotent_requests")
        seen = self.idempotency.get(key)
        if seen is not None:
            if seen[0] != canonical:
                return self._fail("invalid_idempotent_request")
            return make_response(200, {"id": seen[1]}, self._limit_headers())
        response = self._accept(rec.json)
        self.idempotency[key] = (canonical, self.sent_ids[-1])
        return response

    async def _process(
        self,
        request: web.Request,
        rec: Recorded,
        handler: Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]],
        channel: str,
    ) -> web.StreamResponse:
        # A key is "in progress" from arrival until answered (slowed and hung requests too).
        key = rec.header("idempotency-key")
        if not key or key in self._in_flight:
            if key:
                self._concurrent.add(id(rec))
            try:
                return await super()._process(request, rec, handler, channel)
            finally:
                self._concurrent.discard(id(rec))
        self._in_flight.add(key)
        try:
            return await super()._process(request, rec, handler, channel)
        finally:
            self._in_flight.discard(key)

    def _accept(self, body: dict[str, Any]) -> web.Response:
        email_id = str(uuid.uuid4())
        self.sent.append(body)
        self.sent_ids.append(email_id)
        return make_response(200, {"id": email_id}, self._limit_headers())

    @staticmethod
    def _validate(
        body: Mapping[str, Any],
    ) -> tuple[str, str | None] | tuple[str, str | None, int] | None:
        """(name, message[, status]) of the first problem."""
        for name in ("from", "to", "subject"):
            if body.get(name) in (None, "", []):
                return "missing_required_field", f"Missing `{name}` field."
        sender = body["from"]
        if not isinstance(sender, str) or not _FROM_RE.match(sender):
            return "invalid_from_address", None
        to = body["to"]
        recipients = [to] if isinstance(to, str) else to
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            return "validation_error", "The `to` field must be a `string` or an `array`."
        if len(recipients) > 50:
            return "validation_error", "The `to` field must contain at most 50 recipients."
        for recipient in recipients:
            if not _FROM_RE.match(recipient):
                return (
                    "validation_error",
                    "Invalid `to` field. The email address needs to follow the "
                    "`email@example.com` or `Name <email@example.com>` format.",
                    422,
                )
        if not isinstance(body["subject"], str):
            return "validation_error", "The `subject` field must be a `string`."
        if body.get("template") is None and body.get("html") is None and body.get("text") is None:
            return "missing_required_field", "Missing `html` or `text` field."
        for name in ("html", "text"):
            if name in body and not isinstance(body[name], str):
                return "validation_error", f"The `{name}` field must be a `string`."
        headers = body.get("headers")
        if headers is not None and (
            not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
        ):
            return "validation_error", "The `headers` field must be an object of strings."
        tags = body.get("tags")
        if tags is not None:
            if not isinstance(tags, list):
                return "validation_error", "The `tags` field must be an `array`."
            for tag in tags:
                if not isinstance(tag, dict) or not all(
                    isinstance(tag.get(k), str) and re.fullmatch(r"[A-Za-z0-9_-]{1,256}", tag[k])
                    for k in ("name", "value")
                ):
                    return (
                        "validation_error",
                        "Tags should only contain ASCII letters, numbers, underscores, or dashes.",
                    )
        for attachment in body.get("attachments") or []:
            if not isinstance(attachment, dict) or not (
                attachment.get("content") or attachment.get("path")
            ):
                return "invalid_attachment", None
        return None
