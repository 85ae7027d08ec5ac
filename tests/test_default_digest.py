"""The digest sent when no `digest` template exists says what each item is: its subject, else
the first line of its body, from its template when it has one, with {{ variables }} filled."""

from __future__ import annotations

import asyncpg

from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context


async def test_the_default_digest_lists_each_items_subject_or_first_line(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        """INSERT INTO pgnotify.templates (key, channel, locale, version, subject, body) VALUES
             ('invoice', 'email', '', 1, 'Invoice {{ n }} is ready', 'Pay it'),
             ('invoice', 'email', 'fr', 1, 'Facture {{ n }} prête', 'Payez'),
             ('shipped', 'email', '', 1, NULL, E'\\n  Order {{ order }} shipped {{ eta | default("soon") }}\\nTrack it')"""
    )
    enqueue = """SELECT pgnotify.enqueue('email', 'ada@example.com', user_id => 'ada',
                     category => 'billing', template => $1, subject => $2, body => $3,
                     payload => $4, locale => $5)"""
    ids = [
        await conn.fetchval(enqueue, "invoice", None, None, {"n": 7}, None),
        await conn.fetchval(enqueue, "invoice", None, None, {"n": 8}, "fr-CA"),
        await conn.fetchval(enqueue, "shipped", None, None, {"order": "A-1"}, None),
        await conn.fetchval(enqueue, None, "Hello {{ name }}", "x", {"name": "Ada"}, None),
        await conn.fetchval(enqueue, None, "", "\n\nFirst line\nsecond", {}, None),
        await conn.fetchval(enqueue, None, "  ", "{{ missing }}", {}, None),
    ]
    await conn.execute(
        """UPDATE pgnotify.notifications SET status = 'held', hold = 'daily',
                  held_at = now() - interval '2 days' WHERE id = ANY($1)""",
        ids,
    )
    assert await conn.fetchval("SELECT pgnotify.build_digests('daily', now(), 0)") == 1
    digest = await conn.fetchrow(
        "SELECT subject, body, payload FROM pgnotify.notifications WHERE digest_of = 'daily'"
    )
    items = digest["payload"]["items"]
    assert [i["line"] for i in items] == [
        "Invoice 7 is ready",
        "Facture 8 prête",
        "Order A-1 shipped",
        "Hello Ada",
        "First line",
        "billing",  # nothing to show: the category, as before
    ]
    rendered = Renderer().render(
        TemplateParts(subject=digest["subject"], body=digest["body"]),
        build_context(digest["payload"]),
    )
    assert rendered.subject == "Your 6 updates"
    assert rendered.text.splitlines()[:2] == ["- Invoice 7 is ready", "- Facture 8 prête"]
