"""One spelling per address, so a suppression recorded from one source matches every other."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=16384)  # ~40 µs a parse; the same people are texted again and again
def to_e164(number: str, region: str) -> str | None:
    """+14155550123 form, or None when the number is not a valid phone number."""
    # imported on the first phone number: ~1 MB resident that a worker without SMS never needs
    import phonenumbers  # noqa: PLC0415

    try:
        parsed = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def normalize(channel: str, address: str, region: str = "US") -> str:
    """Email lower case; phone numbers E.164 (as given when unparseable); others unchanged."""
    if channel == "email":
        return address.strip().lower()
    if channel == "sms":
        return to_e164(address, region) or address.strip()
    return address
