"""Fake provider servers for tests: real HTTP (aiohttp) and SMTP (aiosmtpd) servers on
127.0.0.1 that speak the providers' documented wire formats (see /work/research/*.md).

- `resend.FakeResend`, `sendgrid.FakeSendGrid`, `twilio.FakeTwilio`, `fcm.FakeFCM`: HTTP,
  all built on `base.FakeServer` (`requests`, `wait_for`, `fail_next`, `slow_next`,
  `hang_next`).
- `smtp.FakeSMTP`: SMTP with optional AUTH, STARTTLS or implicit TLS.
- `webhook.FakeWebhookReceiver`: an outbound-webhook consumer that verifies Standard Webhooks
  signatures; `webpush.FakePushService`: a push service that checks VAPID and decrypts.
- `webhooks_in`: signing helpers for inbound Resend (Svix) and SendGrid events;
  `twilio.twilio_signature` / `twilio.post_status_callback` for Twilio.
"""
