"""A fake Google OAuth2 token endpoint plus FCM HTTP v1 (research: sms_push_providers.md §3-4).

`POST /token` takes a service-account JWT-bearer grant, `POST /v1/projects/{id}/messages:send`
takes the Bearer access tokens it issued.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes.base import Body, FakeServer, Recorded, Script, bearer_token, make_response

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = {
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
}
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
MESSAGE_FIELDS = {
    "name",
    "data",
    "notification",
    "android",
    "webpush",
    "apns",
    "fcm_options",
    "token",
    "topic",
    "condition",
    "fid",
}
TARGETS = ("token", "topic", "condition", "fid")
SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MISSING_CREDENTIAL = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)

#: HTTP status -> google.rpc code name
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
#: FcmError.errorCode -> (HTTP status, message)
FCM_ERROR_CODES = {
    "INVALID_ARGUMENT": (400, "Request contains an invalid argument."),
    "UNREGISTERED": (404, "Requested entity was not found."),
    "SENDER_ID_MISMATCH": (403, "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "Quota exceeded for quota metric 'Send requests'."),
    "UNAVAILABLE": (503, "The service is currently unavailable."),
    "INTERNAL": (500, "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "Auth error from APNS or Web Push Service"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_service_account(
    token_uri: str,
    project_id: str = "demo-project",
    *,
    private_key: rsa.RSAPrivateKey | None = None,
    client_email: str | None = None,
) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
    """A service-account JSON (as a dict) with a fresh RSA-2048 key, and that key."""
    key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    email = client_email or f"fcm-sender@{project_id}.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**21)).zfill(21),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": (
            f"https://www.googleapis.com/robot/v1/metadata/x509/{email.replace('@', '%40')}"
        ),
        "universe_domain": "googleapis.com",
    }
    return info, key


def sign_assertion(
    info: dict[str, Any],
    key: rsa.RSAPrivateKey,
    *,
    scope: str = "https://www.googleapis.com/auth/firebase.messaging",
    audience: str = GOOGLE_TOKEN_URL,
    iat: int | None = None,
    lifetime: int = 3600,
    header: dict[str, Any] | None = None,
) -> str:
    """A JWT-bearer assertion as google-auth builds it (for tests of the fake itself)."""
    now = int(time.time()) if iat is None else iat
    head = header or {"typ": "JWT", "alg": "RS256", "kid": info["private_key_id"]}
    claims = {
        "iat": now,
        "exp": now + lifetime,
        "iss": info["client_email"],
        "aud": audience,
        "scope": scope,
    }
    signing_input = (
        b64url(json.dumps(head, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


class TokenError(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error, self.description = error, description


class FakeFCM(FakeServer):
    """Token endpoint `POST /token` and `POST /v1/projects/{project_id}/messages:send`.

    - `requests`: the send requests only; `token_requests`: the token requests.
    - `issued`: access token -> expiry (time.monotonic()); `expire_tokens()` expires them all.
    - `sent`: the `message` objects accepted (not `validate_only` ones); `names[i]`: the
      message name returned for `sent[i]`.
    - `unregistered`: tokens answered with 404 UNREGISTERED.
    - `key_id`: when set, the JWT header's `kid` must equal it (else any non-empty kid).
    - `metadata_requests`: requests to the GCE/GKE metadata server's token path, which it also
      serves (GET /computeMetadata/v1/instance/service-accounts/default/token, only with
      `Metadata-Flavor: Google`, as the real one): point `PGNOTIFY_FCM_METADATA_HOST` at
      `metadata_host`. Its tokens are good for `metadata_expires_in` seconds.
    Scripts: `fail_next`/`slow_next`/`hang_next`/`fcm_error_next` act on sends,
    `token_error_next` on the token endpoint, `_push(..., "metadata")` on the metadata server.
    """

    token_channel = "token"
    metadata_channel = "metadata"
    metadata_token_path = "/computeMetadata/v1/instance/service-accounts/default/token"

    def __init__(
        self,
        service_account_public_key: rsa.RSAPublicKey,
        client_email: str,
        project_id: str = "demo-project",
        *,
        expires_in: int = 3599,
        key_id: str | None = None,
        project_number: str | None = None,
        tls: bool = False,
    ) -> None:
        super().__init__(tls=tls)
        self.public_key = service_account_public_key
        self.client_email = client_email
        self.project_id = project_id
        self.project_number = project_number
        self.expires_in = expires_in
        self.key_id = key_id
        self.token_requests: list[Recorded] = []
        self.metadata_requests: list[Recorded] = []
        self.metadata_expires_in = expires_in
        self.issued: dict[str, float] = {}
        self.unregistered: set[str] = set()
        self.sent: list[dict[str, Any]] = []
        self.names: list[str] = []
        self.service_account: dict[str, Any] | None = None
        self.private_key: rsa.RSAPrivateKey | None = None

    @classmethod
    async def start_with_service_account(
        cls, project_id: str = "demo-project", **kwargs: Any
    ) -> FakeFCM:
        """Generate a key, start a fake trusting it, and set `service_account` (its token_uri
        points at the fake) and `private_key`. Stop it with `await fake.stop()`."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"fcm-sender@{project_id}.iam.gserviceaccount.com"
        fake = cls(key.public_key(), email, project_id, **kwargs)
        await fake.start()
        info, _ = make_service_account(
            fake.token_uri, project_id, private_key=key, client_email=email
        )
        fake.key_id = fake.key_id or info["private_key_id"]
        fake.service_account, fake.private_key = info, key
        return fake

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    @property
    def metadata_host(self) -> str:
        """host:port of the fake's metadata server (PGNOTIFY_FCM_METADATA_HOST)."""
        return self.url.removeprefix("http://")

    @property
    def send_path(self) -> str:
        return f"/v1/projects/{self.project_id}/messages:send"

    def expire_tokens(self) -> None:
        """Every access token issued so far is answered with 401 from now on."""
        for token in self.issued:
            self.issued[token] = 0.0

    # --- realistic bodies --------------------------------------------------------------------

    @staticmethod
    def error(
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """google.rpc.Status JSON; `error_code` adds an FcmError detail."""
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": STATUS_NAMES.get(status, "UNKNOWN"),
        }
        all_details = list(details or [])
        if error_code is not None:
            all_details.insert(0, {"@type": FCM_ERROR, "errorCode": error_code})
        if all_details:
            error["details"] = all_details
        return {"error": error}

    @classmethod
    def bad_request(cls, message: str, field: str | None = None) -> dict[str, Any]:
        violation = {"field": field, "description": message} if field else {"description": message}
        return cls.error(
            400, message, details=[{"@type": BAD_REQUEST, "fieldViolations": [violation]}]
        )

    def error_body(self, status: int) -> tuple[Body, dict[str, str]]:
        code = {400: "INVALID_ARGUMENT", 404: "UNREGISTERED", 429: "QUOTA_EXCEEDED"}.get(status)
        code = code or {500: "INTERNAL", 503: "UNAVAILABLE"}.get(status)
        fallback = {
            401: UNAUTHENTICATED,
            403: "The caller does not have permission",
            504: "Deadline exceeded.",
        }.get(status, f"HTTP {status}")
        message = FCM_ERROR_CODES[code][1] if code else fallback
        return self.error(status, message, error_code=code), {}

    def fcm_error_next(
        self,
        n: int,
        status: int,
        error_code: str,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next `n` sends with an FcmError `error_code` (optionally Retry-After)."""
        text = message or FCM_ERROR_CODES.get(error_code, (status, f"FCM error {error_code}"))[1]
        details = None
        if error_code == "QUOTA_EXCEEDED":
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"subject": f"project_number:{self.project_number or '0'}"}],
                }
            ]
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        body = self.error(status, text, error_code=error_code, details=details)
        self.fail_next(n, status=status, body=body, headers=headers)

    def token_error_next(
        self,
        n: int,
        *,
        status: int = 500,
        error: str = "internal_failure",
        description: str = "Internal failure.",
        delay: float = 0.0,
    ) -> None:
        """Answer the next `n` token requests with an OAuth2 error."""
        body = {"error": error, "error_description": description}
        self._push(Script("respond", n, status=status, body=body, delay=delay), self.token_channel)

    # --- routes ------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        app.router.add_post(
            "/token",
            self._route(self._token, channel=self.token_channel, into=lambda: self.token_requests),
        )
        app.router.add_post("/v1/projects/{project}/messages:send", self._route(self._send))
        app.router.add_get(
            self.metadata_token_path,
            self._route(
                self._metadata_token,
                channel=self.metadata_channel,
                into=lambda: self.metadata_requests,
            ),
        )

    async def _unknown_route(self, request: web.Request) -> web.StreamResponse:
        message = f"The requested URL {request.path} was not found on this server."
        return make_response(404, self.error(404, message))

    # --- token endpoint ----------------------------------------------------------------------

    async def _token(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        try:
            self._check_grant(rec)
        except TokenError as e:
            return make_response(400, {"error": e.error, "error_description": e.description})
        token = "ya29.fake-" + secrets.token_urlsafe(48)
        self.issued[token] = time.monotonic() + self.expires_in
        return make_response(
            200,
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"},
            {"Cache-Control": "no-cache, no-store, max-age=0, must-revalidate"},
        )

    async def _metadata_token(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        """The metadata server: the workload's own token, no grant; the header is mandatory
        (and a forwarded request, X-Forwarded-For, is refused, as GCE does)."""
        if rec.header("metadata-flavor") != "Google" or rec.header("x-forwarded-for"):
            return web.Response(
                status=403,
                text="Missing required header: Metadata-Flavor",
                content_type="text/html",
            )
        token = "ya29.metadata-" + secrets.token_urlsafe(48)
        self.issued[token] = time.monotonic() + self.metadata_expires_in
        return make_response(
            200,
            {
                "access_token": token,
                "expires_in": self.metadata_expires_in,
                "token_type": "Bearer",
            },
        )

    def _check_grant(self, rec: Recorded) -> None:
        form = rec.form or {}
        grant_type = form.get("grant_type")
        if not grant_type:
            raise TokenError("unsupported_grant_type", "Invalid grant_type: ")
        if grant_type != JWT_BEARER:
            raise TokenError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = form.get("assertion")
        if not assertion:
            raise TokenError("invalid_request", "Missing required parameter: assertion")
        parts = assertion.split(".")
        if len(parts) != 3:
            raise TokenError("invalid_grant", "Invalid JWT: malformed (expected 3 segments).")
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except (ValueError, binascii.Error) as e:
            raise TokenError("invalid_grant", f"Invalid JWT: not base64url JSON ({e}).") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenError("invalid_grant", "Invalid JWT: header and claims must be objects.")
        if header.get("alg") != "RS256":
            raise TokenError("invalid_grant", "Invalid JWT: alg must be RS256.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("invalid_grant", "Invalid JWT: header has no kid.")
        if self.key_id is not None and kid != self.key_id:
            raise TokenError("invalid_grant", "Invalid JWT Signature.")
        try:
            self.public_key.verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            raise TokenError("invalid_grant", "Invalid JWT Signature.") from None
        if claims.get("iss") != self.client_email:
            raise TokenError("invalid_grant", "Invalid grant: account not found")
        if claims.get("aud") not in {self.token_uri, GOOGLE_TOKEN_URL}:
            raise TokenError(
                "invalid_grant",
                f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_URL}",
            )
        iat, exp = claims.get("iat"), claims.get("exp")
        now = time.time()
        if (
            not isinstance(iat, int | float)
            or not isinstance(exp, int | float)
            or exp - iat > 3600
            or exp <= iat
            or exp <= now
            or iat > now + 300  # a few minutes of clock skew
        ):
            raise TokenError("invalid_grant", SHORT_LIVED)
        scope = claims.get("scope")
        scopes = set(scope.split()) if isinstance(scope, str) else set()
        if not scopes & FCM_SCOPES:
            raise TokenError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")

    # --- messages:send -----------------------------------------------------------------------

    async def _send(self, request: web.Request, rec: Recorded) -> web.StreamResponse:
        if rec.header("authorization") is None:
            return self._unauthenticated(MISSING_CREDENTIAL)
        token = bearer_token(rec)
        expiry = self.issued.get(token or "")
        if expiry is None or expiry <= time.monotonic():
            return self._unauthenticated(UNAUTHENTICATED)
        project = request.match_info["project"]
        if project not in {self.project_id, self.project_number}:
            message = (
                "Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist)."
            )
            return make_response(403, self.error(403, message))
        if rec.json is None:
            return make_response(
                400, self.bad_request("Invalid JSON payload received. Unexpected token.")
            )
        problem = self._validate(rec.json)
        if problem is not None:
            return make_response(400, problem)
        message = rec.json["message"]
        if message.get("token") in self.unregistered:
            return make_response(
                404, self.error(404, "Requested entity was not found.", error_code="UNREGISTERED")
            )
        if rec.json.get("validate_only") is True:
            return make_response(
                200, {"name": f"projects/{self.project_id}/messages/fake_message_id"}
            )
        self.sent.append(message)
        message_id = f"0:{time.time_ns() // 1000}%{secrets.token_hex(8)}"
        self.names.append(f"projects/{self.project_id}/messages/{message_id}")
        return make_response(200, {"name": self.names[-1]})

    def _unauthenticated(self, message: str) -> web.Response:
        return make_response(
            401,
            self.error(401, message),
            {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
        )

    def _validate(self, body: Any) -> dict[str, Any] | None:
        if not isinstance(body, dict):
            return self.bad_request("Invalid JSON payload received. Expected an object.")
        for name in body:
            if name not in {"message", "validate_only", "validateOnly"}:
                return self.bad_request(
                    f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
                )
        message = body.get("message")
        if message is None:
            return self.error(
                400,
                "Request contains an invalid argument.",
                details=[
                    {
                        "@type": BAD_REQUEST,
                        "fieldViolations": [
                            {"field": "message", "description": "Message must be set."}
                        ],
                    }
                ],
            )
        if not isinstance(message, dict):
            return self.bad_request(
                "Invalid value at 'message' (type.googleapis.com/google.firebase.fcm.v1.Message)",
                "message",
            )
        for name in message:
            if name not in MESSAGE_FIELDS:
                return self.bad_request(
                    f"Invalid JSON payload received. Unknown name \"{name}\" at 'message': "
                    "Cannot find field."
                )
        targets = [t for t in TARGETS if t in message]
        if len(targets) > 1:
            return self.bad_request(
                f"Invalid value at 'message' (oneof), oneof field 'target' is already set. "
                f"Cannot set '{targets[1]}'",
                "message",
            )
        if not targets:
            return self.error(
                400,
                "Recipient of the message is not set.",
                error_code="INVALID_ARGUMENT",
                details=[
                    {
                        "@type": BAD_REQUEST,
                        "fieldViolations": [
                            {
                                "field": "message",
                                "description": "Recipient of the message is not set.",
                            }
                        ],
                    }
                ],
            )
        target = message[targets[0]]
        if not isinstance(target, str):
            return self.bad_request(
                f"Invalid value at 'message.{targets[0]}' (TYPE_STRING), {json.dumps(target)}",
                f"message.{targets[0]}",
            )
        if targets[0] == "token" and not target.strip():
            return self.error(
                400,
                "The registration token is not a valid FCM registration token",
                error_code="INVALID_ARGUMENT",
            )
        data = message.get("data")
        if data is not None:
            if not isinstance(data, dict):
                return self.bad_request(
                    "Invalid value at 'message.data' "
                    "(type.googleapis.com/google.firebase.fcm.v1.Message.DataEntry), "
                    f"{json.dumps(data)}",
                    "message.data",
                )
            for i, (key, value) in enumerate(data.items()):
                if not isinstance(value, str):
                    text = f"Invalid value at 'message.data[{i}].value' (TYPE_STRING), {json.dumps(value)}"
                    return self.bad_request(text, f"message.data[{i}].value")
                if key in {"from", "message_type"} or key.startswith(("google.", "gcm.")):
                    return self.error(
                        400, f"Invalid data payload key: {key}", error_code="INVALID_ARGUMENT"
                    )
        return None
