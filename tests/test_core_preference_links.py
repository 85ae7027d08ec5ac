"""Preference-centre links and CSRF tokens (pure): round trip, tampering, expiry, and one key per
purpose, so no unsubscribe token opens the preference centre and no link is a CSRF token."""

from __future__ import annotations

import pytest

from pgnotify_worker.core import preference_links as links
from pgnotify_worker.core import unsubscribe

KEY = b"unsubscribe-secret-0123456789abcdef"
NOW = 1_800_000_000


def test_a_link_round_trips_and_holds_no_address() -> None:
    token = links.make_token(KEY, "ann@example.com-id", NOW + 60)
    assert "@" not in token and token.startswith("p1.")
    assert links.read_token(KEY, token, NOW) == links.PreferenceLink("ann@example.com-id", NOW + 60)


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "altered"),
        (lambda t: t.replace(t.split(".")[1], links._b64(b"bob")), "altered"),
        (lambda t: t.replace(f".{NOW + 60}.", f".{NOW + 99999}."), "altered"),
        (lambda t: t.rsplit(".", 1)[0], "incomplete"),
        (lambda t: "", "no token"),
        (lambda t: t + "é", "malformed"),
        (lambda t: "x" * 5000, "malformed"),
    ],
)
def test_a_changed_link_is_refused_saying_why(mangle: object, words: str) -> None:
    token = links.make_token(KEY, "ann", NOW + 60)
    with pytest.raises(links.LinkInvalid, match=words):
        links.read_token(KEY, mangle(token), NOW)  # type: ignore[operator]


def test_an_expired_link_is_refused() -> None:
    token = links.make_token(KEY, "ann", NOW - 1)
    with pytest.raises(links.LinkInvalid, match="expired"):
        links.read_token(KEY, token, NOW)


def test_another_key_is_refused() -> None:
    token = links.make_token(b"another-key-0123456789abcdef0123", "ann", NOW + 60)
    with pytest.raises(links.LinkInvalid, match="altered"):
        links.read_token(KEY, token, NOW)


def test_tokens_of_one_purpose_never_pass_for_another() -> None:
    unsub = unsubscribe.make_token(KEY, "ann", None, NOW + 60)
    with pytest.raises(links.LinkInvalid):
        links.read_token(KEY, unsub, NOW)
    pref = links.make_token(KEY, "ann", NOW + 60)
    with pytest.raises(unsubscribe.TokenInvalid):
        unsubscribe.read_token(KEY, pref, NOW)
    csrf = links.make_csrf(KEY, pref, NOW)
    assert not links.csrf_ok(KEY, csrf, csrf, NOW)


def test_csrf_is_bound_to_its_page_and_ages_out() -> None:
    token = links.make_token(KEY, "ann", NOW + 86_400)
    other = links.make_token(KEY, "bob", NOW + 86_400)
    csrf = links.make_csrf(KEY, token, NOW)
    assert links.csrf_ok(KEY, token, csrf, NOW + 10)
    assert not links.csrf_ok(KEY, other, csrf, NOW + 10)
    assert not links.csrf_ok(KEY, token, csrf, NOW + links.CSRF_SECONDS + 1)
    assert not links.csrf_ok(KEY, token, links.make_csrf(KEY, token, NOW + 3600), NOW)  # future
    for bad in ("", ".", "abc.def", f"{NOW}.", f"{NOW}.é", "9" * 40 + ".x"):
        assert not links.csrf_ok(KEY, token, bad, NOW)
