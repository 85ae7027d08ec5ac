"""Masking of recipients and scrubbing of secrets, emails and phone numbers from free text."""

from __future__ import annotations

import pytest

from pgnotify_worker.core.redact import (
    mask_email,
    mask_phone,
    mask_recipient,
    mask_token,
    mask_url,
    scrub,
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.com", "a***@e***.com"),
        ("bob.smith+tag@mail.example.org", "b***@m***.org"),
        ("x@y.io", "x***@y***.io"),
        ("carol@sub.example.co.uk", "c***@s***.uk"),
        ("not-an-email", "***"),
        ("", "***"),
    ],
)
def test_mask_email(address: str, expected: str) -> None:
    assert mask_email(address) == expected


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+14155550123", "+*******0123"),
        ("+44 20 7946 0958", "+********0958"),
        ("4155550123", "******0123"),
        ("+12", "+**"),
        ("", "**"),
    ],
)
def test_mask_phone_keeps_only_the_last_four_digits(number: str, expected: str) -> None:
    assert mask_phone(number) == expected


def test_mask_phone_never_reveals_a_short_number() -> None:
    assert "1234" not in mask_phone("+1234")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hooks.example.com/in/T0K3N?sig=abc#frag", "https://hooks.example.com/…"),
        ("https://user:pa55w0rd@hooks.example.com:8443/p/x", "https://hooks.example.com:8443/…"),
        ("http://10.0.0.7/webhook", "http://10.0.0.7/…"),
        ("https://hooks.example.com", "https://hooks.example.com/…"),
    ],
)
def test_mask_url_keeps_scheme_host_and_port_only(url: str, expected: str) -> None:
    masked = mask_url(url)
    assert masked == expected
    for secret in ("T0K3N", "sig=abc", "pa55w0rd", "user", "/in/", "/p/x"):
        assert secret not in masked


@pytest.mark.parametrize(
    ("token", "expected"),
    [("fcm-device-token-123456", "fcm-…"), ("user_42", "user…"), ("abcd", "…"), ("", "…")],
)
def test_mask_token_keeps_the_first_four_characters(token: str, expected: str) -> None:
    assert mask_token(token) == expected


@pytest.mark.parametrize(
    ("channel", "recipient", "expected"),
    [
        ("email", "alice@example.com", "a***@e***.com"),
        ("sms", "+14155550123", "+*******0123"),
        ("webhook", "https://hooks.example.com/secret-path?t=1", "https://hooks.example.com/…"),
        ("push", "fcm-device-token-123456", "fcm-…"),
        ("inapp", "user_42", "user…"),
    ],
)
def test_mask_recipient_by_channel(channel: str, recipient: str, expected: str) -> None:
    assert mask_recipient(channel, recipient) == expected


@pytest.mark.parametrize("url", ["http://hooks.example.com:99999/x", "http://h:-1/"])
def test_mask_url_never_raises_on_a_bad_port(url: str) -> None:
    masked = mask_recipient("webhook", url)
    assert "/x" not in masked


def test_mask_url_of_unparseable_url_is_a_placeholder() -> None:
    assert mask_url("http://[::1/x") == "<url>"


SECRETS = ["sk_live_abcdef12", "whsec_c2VjcmV0LXZhbHVlLTEyMzQ1Ng==", "hunter2pw"]


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("auth failed with sk_live_abcdef12 for x", "sk_live_abcdef12"),
        ("secret=whsec_c2VjcmV0LXZhbHVlLTEyMzQ1Ng== bad", "c2VjcmV0LXZhbHVlLTEyMzQ1Ng"),
        ("postgresql://app:hunter2pw@db:5432/app refused", "hunter2pw"),
        ("hunter2pwhunter2pw twice", "hunter2pw"),
    ],
)
def test_scrub_removes_secret_values(text: str, gone: str) -> None:
    scrubbed = scrub(text, SECRETS)
    assert gone not in scrubbed
    assert "***" in scrubbed


def test_scrub_ignores_secrets_shorter_than_six_characters() -> None:
    # Short values would shred ordinary words; they are not scrubbed.
    assert scrub("the abc token and x", ["abc", "", "x"]) == "the abc token and x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("to alice.smith@example.com failed", "to a***@e***.com failed"),
        ("cc: bob@mail.example.org, carol@x.io", "cc: b***@m***.org, c***@x***.io"),
        ("call +1 (415) 555-0123 now", "call +*******0123 now"),
        ("sms to +14155550123.", "sms to +*******0123."),
        ("+447946095812", "+********5812"),
    ],
)
def test_scrub_masks_emails_and_e164_numbers(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "worker vm-6745-7321e8 started",
        "claimed at 2026-11-23 07:46:45 by worker",
        "ts 2026-11-23T07:46:45.123+00:00",
        "Date: Mon, 23 Nov 2026 07:46:45 +0000",
        "notification 123456789 attempt 3",
        "uid 0192f1c4-7d3e-7a6b-9c1d-2e3f4a5b6c7d",
        "order #4155550123 total 12.50",
        "pid 4821 host ip-10-0-1-23.ec2.internal",
        "version 1.2.3-rc.1, 50 in flight",
    ],
)
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text, SECRETS) == text
