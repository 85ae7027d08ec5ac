"""What every email provider shares: the sender, the unsubscribe headers, checks on content."""

from __future__ import annotations

from collections.abc import Sequence
from email.headerregistry import Address
from email.utils import parseaddr

from pgnotify_worker.errors import ProviderConfigError
from pgnotify_worker.models import Outcome, Permanent, RenderedMessage


def parse_sender(sender: str | None, provider: str) -> tuple[str, str]:
    """(display name, address) of PGNOTIFY_EMAIL_FROM, or a ProviderConfigError."""
    if not sender:
        raise ProviderConfigError(
            f"{provider}: PGNOTIFY_EMAIL_FROM is not set (e.g. 'Acme <no-reply@acme.com>')"
        )
    name, address = parseaddr(sender)
    if "@" not in address or "\r" in sender or "\n" in sender:
        raise ProviderConfigError(f"{provider}: PGNOTIFY_EMAIL_FROM is not an email address")
    return name, address


def format_sender(name: str, address: str) -> str:
    """'Name <address>' with the name quoted where needed."""
    local, _, domain = address.partition("@")
    return str(Address(display_name=name, username=local, domain=domain)) if name else address


def unsubscribe_headers(message: RenderedMessage) -> dict[str, str]:
    """RFC 2369 / RFC 8058 one-click headers when the message has an https unsubscribe URL (a
    critical category's message has an empty one: no headers)."""
    url = message.unsubscribe_url
    if not url or not url.startswith("https://") or any(c in url for c in "\r\n<>"):
        return {}
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


def missing_content(message: RenderedMessage) -> Permanent | None:
    """An email needs a subject and a text or HTML body."""
    if not message.subject:
        return Permanent("no_subject", "an email needs a subject")
    if not message.text and not message.html:
        return Permanent("no_content", "an email needs a text or HTML body")
    return None


def whole_or_each(
    outcomes: Sequence[Outcome | None], whole: Outcome
) -> Sequence[Outcome] | Outcome:
    """A batch request failed as a whole: that outcome alone when every message was in it (the
    caller may retry the same request), else each message's own (refused before sending) or it."""
    if all(o is None for o in outcomes):
        return whole
    return [whole if o is None else o for o in outcomes]
