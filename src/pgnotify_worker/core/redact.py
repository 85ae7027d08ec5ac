"""Masking of addresses and removal of secrets before anything is logged or shown."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
from collections.abc import Iterable
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus, urlsplit


def mask_email(address: str) -> str:
    """a***@e***.com"""
    local, _, domain = address.partition("@")
    if not domain:
        return "***"
    name, dot, tld = domain.rpartition(".")
    if not dot:
        return f"{local[:1]}***@{domain[:1]}***"
    return f"{local[:1]}***@{name[:1]}***.{tld}"


def mask_phone(number: str) -> str:
    """+1******0123: the last four digits only."""
    digits = re.sub(r"\D", "", number)
    prefix = "+" if number.strip().startswith("+") else ""
    return f"{prefix}{'*' * max(len(digits) - 4, 2)}{digits[-4:] if len(digits) > 4 else ''}"


def mask_url(url: str) -> str:
    """Scheme and host only: paths often carry tokens."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port raises only when read
        return "<url>"
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/…"


def mask_token(token: str) -> str:
    """A device token or user id: the first four characters."""
    return f"{token[:4]}…" if len(token) > 4 else "…"


def mask_recipient(channel: str, recipient: str) -> str:
    """The recipient in a form safe for logs."""
    if channel == "email":
        return mask_email(recipient)
    if channel == "sms":
        return mask_phone(recipient)
    if channel == "webhook":
        return mask_url(recipient)
    return mask_token(recipient)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secret values (in any encoding), credentials, email addresses and phone numbers
    from free text (no length cap). Prefer a Scrubber built once where it is called often."""
    return _scrubber_for(tuple(secrets)).clean(text, limit=None)


# --- the Scrubber: every configured secret in every encoding, credentials, JWTs, addresses ------

_O = TypeVar("_O")
REDACTED = "***"
CUT_MARKER = "…[cut]"
DEFAULT_LIMIT = 500  # a stored or shown provider error
MAX_INPUT = 65_536  # longer text is cut before scrubbing (bounded cost); the cut is scrubbed too
MIN_SECRET = 6  # shorter values would shred ordinary words
CODE_LIMIT = 64
_B64_URLSAFE = str.maketrans("+/", "-_")
_SECRET_JSON_KEYS = ("private_key", "private_key_id", "client_secret", "refresh_token")

_PEM = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"
_PRIVATE_KEY_JSON = r"(?P<pkjson_key>\"private_key\"\s*:\s*)\"(?:[^\"\\]|\\.)*\"?"
# eyJ is base64url of '{"': a JWT's header (and usually its payload); truncated ones too
_JWT = r"eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){0,2}"
_SCHEME_SEP = r"(?:[ \t]+|%20|\+)"
_AUTH_SCHEME = (
    rf"(?i:\b(?P<auth_scheme>bearer|basic|digest){_SCHEME_SEP})"
    r"(?P<auth_value>[A-Za-z0-9._~+/=:%-]{6,})"
)
_KEY_VALUE = (
    r"(?P<kv_key>(?i:\b(?:proxy-)?authorization|\bx-api-key|\bapi[-_]?key|\bapikey|\bauth[-_]?token"
    r"|\baccess[-_]?token|\brefresh[-_]?token|\bid[-_]?token|\bclient[-_]?secret|\bpassword"
    r"|\bpasswd|\bsecret|\bassertion|\bsignature)"
    r"(?:\\?[\"'])?\s*(?::|=|%3A|%3D)\s*(?:\\?[\"'])?)"
    rf"(?P<kv_value>(?i:(?:bearer|basic|digest){_SCHEME_SEP})?[^\s\"'&,;}}\]\\]+)"
)
# push recipients inside an echoed JSON body: an FCM registration token, a Web Push subscription
_DEVICE_JSON = (
    r"(?P<device_key>\\?\"(?:token|registration_token|device_token|endpoint|p256dh|auth)\\?\""
    r"\s*:\s*)\\?\"(?:[^\"\\]|\\[^\"])*\\?\"?"
)
_AT = r"(?:@|%40|%2540|\\u0040)"
_EMAIL_RE = (
    rf"(?P<email_1>[A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{{0,80}}{_AT}"
    r"(?P<email_2>[A-Za-z0-9-])[A-Za-z0-9.-]{0,253}\.(?P<email_3>[A-Za-z]{2,63})"
)
# + raw (not after another + or a word), or encoded: %2B, %252B (twice), \u002b (JSON); spaces
# inside the number raw, as %20 or as a form's +
_PLUS = r"(?:(?<![\w+])\+|%2B|%252B|\\u002[bB])"
_PHONE_RE = rf"{_PLUS}\d(?:[\d ().-]|%20|\+(?=\d)){{6,}}\d"
_TO_DIGITS = (
    r"(?P<to_key>(?i:\bto)(?:\\?[\"'])?\s*(?::|=|%3A|%3D)\s*(?:\[\s*)?(?:\\?[\"'])?)"
    r"(?P<to_value>\d[\d ().-]{6,}\d)"
)


def _trie_pattern(words: Iterable[str]) -> str:
    """One regex for many literals, as a trie: at each position the engine follows one branch
    per character instead of trying every word (hundreds of forms cost little more than one).
    The longest word wins where one is a prefix of another."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = []
        for first in sorted(k for k in node if k):
            chain, child = [first], node[first]
            while len(child) == 1 and "" not in child:  # a run without choices: no recursion
                ((char, child),) = child.items()
                chain.append(char)
            branches.append(re.escape("".join(chain)) + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return build(root)


def _b64_forms(raw: bytes) -> list[str]:
    """The secret base64-encoded alone (with and without padding), and the characters that
    encode it inside any longer base64 text (user:secret, a JSON document...), at each of the
    three possible alignments; standard and URL-safe alphabets."""
    full = base64.b64encode(raw).decode()
    forms = [full, full.rstrip("=")]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        start, end = -(-8 * shift // 6), (8 * (shift + len(raw))) // 6
        forms.append(encoded[start:end])
    return forms + [f.translate(_B64_URLSAFE) for f in forms]


def _text_forms(value: str) -> list[str]:
    """A value as it shows up in URLs, forms and JSON strings (escaped once or twice)."""
    once = json.dumps(value)[1:-1]
    return [
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        once,
        json.dumps(value, ensure_ascii=False)[1:-1],
        json.dumps(once)[1:-1],
        value.replace("/", "\\/"),
        once.replace("/", "\\/"),
    ]


def _derived(secret: str) -> list[str]:
    """Secret parts of a structured secret: a service-account JSON's key, its PEM lines."""
    parts: list[str] = []
    text = secret.strip()
    if text.startswith("{"):
        try:
            info = json.loads(text)
        except ValueError:
            info = None
        if isinstance(info, dict):
            parts += [str(info[k]) for k in _SECRET_JSON_KEYS if isinstance(info.get(k), str)]
    for part in [secret, *parts]:
        if "-----BEGIN" in part:
            lines = [ln.strip() for ln in part.splitlines() if ln.strip() and "-----" not in ln]
            parts += [ln for ln in lines if len(ln) >= 16]
            parts.append("".join(lines))
    return parts


class Scrubber:
    """Built once from the settings' secrets; `clean` removes every secret (raw, base64 alone or
    inside user:secret and other base64 text, URL-encoded, JSON-escaped), Bearer/Basic
    credentials and Authorization-like values, JWT-shaped strings, PEM private keys, email
    addresses and phone numbers (raw and URL-encoded), then caps the length.

    One precompiled alternation does it in a single pass, however many secrets there are."""

    def __init__(self, secrets: Iterable[str] = (), pairs: Iterable[tuple[str, str]] = ()) -> None:
        values = [s for s in secrets if s and len(s) >= MIN_SECRET]
        values += [p for s in list(values) for p in _derived(s)]
        forms: set[str] = set()
        for value in values:
            forms.update(_text_forms(value))
            forms.update(_b64_forms(value.encode()))
        for user, secret in pairs:
            if user and secret and len(secret) >= MIN_SECRET:
                joined = f"{user}:{secret}"
                forms.update(_text_forms(joined))
                forms.update(_b64_forms(joined.encode()))
        self.forms = sorted((f for f in forms if len(f) >= MIN_SECRET), key=len, reverse=True)
        # forms a cut (an upstream [:300]) may leave half of at the very end of a text
        self._tails = [f for f in self.forms if len(f) <= 4096]
        alternatives = [
            rf"(?P<secret>{_trie_pattern(self.forms)})" if self.forms else None,
            rf"(?P<pem>{_PEM})",
            rf"(?P<pkjson>{_PRIVATE_KEY_JSON})",
            rf"(?P<jwt>{_JWT})",
            rf"(?P<device>{_DEVICE_JSON})",
            rf"(?P<kv>{_KEY_VALUE})",
            rf"(?P<auth>{_AUTH_SCHEME})",
            rf"(?P<email>{_EMAIL_RE})",
            rf"(?P<phone>{_PHONE_RE})",
            rf"(?P<to>{_TO_DIGITS})",
        ]
        self._pattern = re.compile("|".join(a for a in alternatives if a))

    def _replace(self, m: re.Match[str]) -> str:
        kind = m.lastgroup
        if kind == "secret":
            return REDACTED
        if kind == "pem":
            return "<private key>"
        if kind == "pkjson":
            return f'{m.group("pkjson_key")}"{REDACTED}"'
        if kind == "jwt":
            return "<jwt>"
        if kind == "device":
            return f'{m.group("device_key")}"{REDACTED}"'
        if kind == "kv":
            return f"{m.group('kv_key')}{REDACTED}"
        if kind == "auth":
            value = m.group("auth_value")
            if value.isalpha() and value.islower():  # "basic information", not a credential
                return m.group(0)
            return f"{m.group('auth_scheme')} {REDACTED}"
        if kind == "email":
            return f"{m.group('email_1')}***@{m.group('email_2')}***.{m.group('email_3')}"
        if kind == "phone":
            return mask_phone(re.sub(r"^(?:%252B|%2B|\\u002[bB])", "+", m.group(0)))
        if kind == "to":
            return f"{m.group('to_key')}{mask_phone(m.group('to_value'))}"
        return REDACTED  # pragma: no cover - every group is handled above

    def clean(self, text: str, limit: int | None = DEFAULT_LIMIT) -> str:
        """`text` with secrets and addresses removed, at most `limit` characters (None: any)."""
        if not text:
            return text
        if len(text) > MAX_INPUT:
            text = text[:MAX_INPUT]
        text = self._pattern.sub(self._replace, text)
        text = self._cut_tail(text)
        if limit is not None and len(text) > limit:
            keep = max(limit - len(CUT_MARKER), 0)
            text = text[:keep] + CUT_MARKER
        return text

    def _cut_tail(self, text: str) -> str:
        """A secret cut in half at the end of a text (capped upstream) is removed too."""
        for form in self._tails:
            at = text.rfind(form[:MIN_SECRET], max(0, len(text) - len(form)))
            if at >= 0 and form.startswith(text[at:]):
                return text[:at] + REDACTED
        return text

    def code(self, code: str | None) -> str | None:
        """An error code as a short token: [A-Za-z0-9_.:-], at most CODE_LIMIT characters."""
        if code is None:
            return None
        cleaned = self.clean(code, limit=None)
        token = re.sub(r"(?:[^A-Za-z0-9_.:-]|_)+", "_", cleaned).strip("_")
        return token[:CODE_LIMIT] or "error"

    def outcome(self, outcome: _O) -> _O:
        """A send outcome with its code and message scrubbed (Sent passes as it is): for the
        dispatcher to apply where a provider's answer enters, so breakers, logs and spans only
        ever hold clean text."""
        code, message = getattr(outcome, "code", None), getattr(outcome, "message", None)
        if not isinstance(code, str) or not isinstance(message, str):
            return outcome
        return dataclasses.replace(  # type: ignore[type-var]
            outcome, code=self.code(code) or "error", message=self.clean(message)
        )

    def tree(self, value: Any, limit: int | None = DEFAULT_LIMIT) -> Any:
        """Every string inside dicts/lists/tuples cleaned (keys are ours and kept)."""
        if isinstance(value, str):
            return self.clean(value, limit)
        if isinstance(value, dict):
            return {k: self.tree(v, limit) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.tree(v, limit) for v in value]
        return value


@functools.lru_cache(maxsize=16)
def _scrubber_for(secrets: tuple[str, ...]) -> Scrubber:
    return Scrubber(secrets)
