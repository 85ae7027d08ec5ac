"""When a channel's claim loop runs next, and the wake token that spares producers the NOTIFY.

A producer's INSERT notifies only when no worker holds the channel's wake token (schema 0008). So
a worker that holds it must claim again soon by itself, and must not go to sleep while a row that
skipped the NOTIFY can still commit unseen. Per channel:

- asleep: wait for a wake-up (NOTIFY, the fallback poll, a freed slot). A claim that finds
  several rows -- they arrive faster than one wake-up each -- takes the token (if no other
  replica holds it) and the channel is awake. A row at a time keeps the NOTIFY: it is cheap
  then, and the fastest wake-up.
- awake: claim again every `tick` seconds; `linger` seconds after the last claim that found
  several rows, give the token back (producers notify again from then on) and settle.
- settling: claim every `tick` until the hand-over lock is free -- every transaction that
  inserted while the token was held has ended -- then claim once more and sleep.

A claim that finds rows while settling takes the token again. Errors leave the token given back
(the store ends the session that held it) and the loop falls back to the wake-ups of old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import anyio

from pgnotify_worker.ports import DeliveryStore

log = logging.getLogger(__name__)
BUSY_ROWS = 2  # a claim that finds this many rows: they come faster than wake-ups, stay awake


@dataclass
class _Token:
    held: bool = False
    settling: bool = False
    last_busy: float = -float("inf")


class Wakeups:
    """The wait before each round of a channel's claim loop (see the module docstring)."""

    def __init__(
        self, store: DeliveryStore, *, enabled: bool, tick: float = 0.002, linger: float = 0.05
    ) -> None:
        self.store = store
        self.enabled = enabled
        self.tick = tick
        self.linger = linger
        self._tokens: dict[str, _Token] = {}

    def holds(self, channel: str) -> bool:
        """Whether this worker holds the channel's wake token (tests, /status)."""
        token = self._tokens.get(channel)
        return token is not None and token.held

    async def wait(self, channel: str, wake: asyncio.Event) -> None:
        """Return when the channel's claim loop should claim."""
        token = self._tokens.setdefault(channel, _Token())
        if not self.enabled:
            await wake.wait()
            return
        if token.held:
            if time.monotonic() - token.last_busy < self.linger:
                await self._tick(wake)
                return
            await self._give_back(channel, token)
        if token.settling:
            if await self._handover_done(channel):
                token.settling = False
                return  # the last claim: every row that skipped the NOTIFY is committed now
            await self._tick(wake)
            return
        await wake.wait()

    async def claimed(self, channel: str, rows: int) -> None:
        """A claim returned `rows` rows: a busy channel keeps (or takes) the token."""
        if not self.enabled or rows < BUSY_ROWS:
            return
        token = self._tokens.setdefault(channel, _Token())
        token.last_busy = time.monotonic()
        if token.held:
            return
        try:
            token.held = await self.store.wake_token(channel, True)
        except Exception as exc:  # producers keep notifying; nothing is lost
            log.debug("taking the wake token failed: %s", exc)
            token.held = False
        if token.held:
            token.settling = False

    async def stop(self, within: float = 2.0) -> None:
        """No more claims here: give every token back and, once the rows of the producers that
        saw this worker awake are committed (or after `within` seconds), wake the other replicas."""
        held = [channel for channel, token in self._tokens.items() if token.held]
        for channel in held:
            await self._give_back(channel, self._tokens[channel])
        with anyio.move_on_after(within):
            for channel in held:
                while True:
                    if await self._handover_done(channel):
                        break
                    await anyio.sleep(self.tick)
        for channel in held:
            try:
                await self.store.wake_others(channel)
            except Exception as exc:  # their fallback poll finds the rows
                log.debug("waking the other replicas failed: %s", exc)

    async def _handover_done(self, channel: str) -> bool:
        try:
            return await self.store.wake_handover_done(channel)
        except Exception as exc:  # a loop outlives any failure; the claim reports it too
            log.debug("wake hand-over check failed: %s", exc)
            return False

    async def _give_back(self, channel: str, token: _Token) -> None:
        token.held = False
        token.settling = True
        try:
            await self.store.wake_token(channel, False)
        except Exception as exc:  # the store ended the session: the token is free either way
            log.debug("giving the wake token back failed: %s", exc)

    async def _tick(self, wake: asyncio.Event) -> None:
        with anyio.move_on_after(self.tick):
            await wake.wait()
