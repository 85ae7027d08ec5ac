-- The classic fallback, as a pgnotify workflow (docs/workflows.md):
--   show it in the app now -> wait 10 minutes -> if it is still unread, email it
--   -> if the email fails permanently (bounce, rejected, no address), text it.
-- Run it with psql (psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f examples/workflows/fallback.sql)
-- or any client; it is idempotent: running it again defines no new version.
BEGIN;

-- The messages (Jinja2; the run's payload is the template data).
INSERT INTO pgnotify.templates (key, channel, subject, body) VALUES
    ('comment_reply', 'inapp', '{{ author }} replied to you', '{{ excerpt }}'),
    ('comment_reply', 'email', '{{ author }} replied to your comment',
     '{{ author }} wrote: {{ excerpt }}

Read the thread: {{ url }}'),
    ('comment_reply', 'sms', NULL, '{{ author }} replied to you: {{ url }}')
ON CONFLICT DO NOTHING;

SELECT pgnotify.define_workflow('comment_reply_fallback', '[
  {"name": "inapp",  "kind": "send", "channel": "inapp", "template": "comment_reply"},
  {"name": "wait",   "kind": "delay", "minutes": 10},
  {"name": "unread", "kind": "condition", "step": "inapp", "is": "read", "then": "stop"},
  {"name": "email",  "kind": "send", "channel": "email", "template": "comment_reply",
                     "cancel_if": {"step": "inapp", "is": "read"}},
  {"name": "failed", "kind": "condition", "step": "email", "is": "failed", "else": "stop"},
  {"name": "sms",    "kind": "send", "channel": "sms", "template": "comment_reply"}
]'::jsonb, category => 'comments', description => 'in-app, then email if unread, then SMS');

COMMIT;

-- Then, in the application's own transaction, once per event:
--   SELECT pgnotify.trigger('comment_reply_fallback', 'user-42',
--       '{"author": "Ada", "excerpt": "Good point!", "url": "https://example.com/t/7"}',
--       idempotency_key => 'comment-9001:user-42');
