"""What a key and its tenant have used, as read for the key-info routes. Pure.

Auth reads it (``Limiter.read_state``, one read-only script) instead of
admitting the request, signs it into the identity
(:attr:`~neuronetz_gateway.domain.identity.Identity.key_state`), and the
proxy renders it (:mod:`neuronetz_gateway.domain.key_info`). Only the
limits that are set are counted; everything else is ``None``.

Rolling windows (requests and tokens per minute) carry the time at which
their ``remaining`` next grows: when the entry that binds leaves the 60 s
window (:func:`window_reset_ms`).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

__all__ = ["KeyState", "LevelState", "WindowState", "window_reset_ms"]

_WINDOW_MS = 60_000


class WindowState(msgspec.Struct, frozen=True, array_like=True):
    """A rolling 60 s window: what it counts now, and when ``remaining`` next grows."""

    used: int
    resets_at_ms: int | None = None  # None: nothing counted, so nothing will leave


class LevelState(msgspec.Struct, frozen=True, omit_defaults=True):
    """One level (the key or its tenant); ``None`` where that level sets no limit."""

    requests: WindowState | None = None
    tokens: WindowState | None = None
    concurrency: int | None = None  # leases held now
    daily_tokens: int | None = None  # budget counters: spent + reserved
    monthly_tokens: int | None = None
    total_tokens: int | None = None


class KeyState(msgspec.Struct, frozen=True, omit_defaults=True):
    """Both levels, read at ``read_at_ms`` (unix ms) in one round trip."""

    read_at_ms: int
    key: LevelState = LevelState()
    tenant: LevelState = LevelState()


def window_reset_ms(entries: Iterable[tuple[int, int]], limit: int) -> int | None:
    """When ``remaining`` of a window next grows: entries are (unix ms counted at, amount).

    Below the limit, that is when the oldest entry leaves; at or over it,
    when enough have left to bring the count under the limit. ``None`` for
    an empty window.
    """
    live = sorted(entries)
    if not live:
        return None
    left = sum(amount for _, amount in live)
    if left < limit:
        return live[0][0] + _WINDOW_MS
    for at_ms, amount in live:
        left -= amount
        if left < limit:
            return at_ms + _WINDOW_MS
    return live[-1][0] + _WINDOW_MS  # a limit of 0: room never comes; say when all have left
