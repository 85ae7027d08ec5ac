"""Masking of addresses and removal of secrets before anything is logged or shown."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

_EMAIL = re.compile(
    r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9-])[A-Za-z0-9.-]*\.([A-Za-z]{2,})"
)
_PHONE = re.compile(r"(?<![\w+])\+\d[\d ()-]{6,}\d")  # E.164-looking numbers only


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
    """Remove secret values, email addresses and phone numbers from free text."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    text = _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}***.{m.group(3)}", text)
    return _PHONE.sub(lambda m: mask_phone(m.group(0)), text)
