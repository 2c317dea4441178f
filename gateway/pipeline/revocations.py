"""Revoked session ids held in memory until their last access token can no longer be valid.

Fed by the Redis revocation feed (see app.py), so checking a request costs one dict lookup.
Listeners (open WebSockets of a session) are told the moment their session is revoked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.clock import Clock


class RevocationList:
    def __init__(self, clock: Clock):
        self._clock = clock
        self._until: dict[str, int] = {}
        self._listeners: dict[str, set[Callable[[], None]]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def is_revoked(self, sid: str) -> bool:
        until = self._until.get(sid)
        return until is not None and until > self._clock.now() * 1000

    def add(self, entries: Iterable[tuple[str, int]]) -> None:
        for sid, until in entries:
            if until > self._until.get(sid, 0):
                self._until[sid] = until
            for notify in list(self._listeners.get(sid, ())):
                notify()

    def prune(self) -> None:
        now_ms = self._clock.now() * 1000
        for sid in [s for s, until in self._until.items() if until <= now_ms]:
            del self._until[sid]

    def watch(self, sid: str, notify: Callable[[], None]) -> Callable[[], None]:
        """Call `notify` when `sid` is revoked; returns the function that stops watching."""
        self._listeners.setdefault(sid, set()).add(notify)

        def unwatch() -> None:
            listeners = self._listeners.get(sid)
            if listeners is not None:
                listeners.discard(notify)
                if not listeners:
                    del self._listeners[sid]

        return unwatch
