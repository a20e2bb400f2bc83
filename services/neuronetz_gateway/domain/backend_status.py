"""What is known of each backend right now, and the model set the fleet offers. Pure.

A :class:`BackendStatus` is one backend's last active check: whether it
answered, its installed models (``/api/tags``) and loaded models
(``/api/ps``), as canonical names. The discovery shares these through Redis
(one JSON document per backend), so every proxy replica and ``backend
list`` read the same picture. :func:`offered_models` is the model set of the
fleet: the union of the installed models of the backends a request may go
to (healthy and not drained), which the proxy intersects with what a key
may use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

__all__ = ["BackendStatus", "decode_status", "encode_status", "offered_models"]


class BackendStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One backend's last check (``checked_at``: UNIX seconds)."""

    name: str
    url: str
    checked_at: float
    reachable: bool
    installed: tuple[str, ...] = ()
    loaded: tuple[str, ...] = ()
    #: the raw ``/api/tags`` entries, by which ``/api/tags`` and ``/v1/models`` answer
    tags: tuple[dict[str, Any], ...] = ()
    #: why the check failed (``connect_error``, ``timeout``, ``status 500``, ``bad_body``)
    error: str | None = None

    @property
    def installed_set(self) -> frozenset[str]:
        return frozenset(self.installed)

    @property
    def loaded_set(self) -> frozenset[str]:
        return frozenset(self.loaded)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(BackendStatus)


def encode_status(status: BackendStatus) -> bytes:
    return _encoder.encode(status)


def decode_status(raw: bytes) -> BackendStatus | None:
    """A shared status, or ``None`` when it is unreadable (written by another version)."""
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def offered_models(statuses: Iterable[BackendStatus], usable: Iterable[str]) -> frozenset[str]:
    """The union of the installed models of the ``usable`` backends (by name)."""
    names = set(usable)
    offered: set[str] = set()
    for status in statuses:
        if status.name in names and status.reachable:
            offered.update(status.installed)
    return frozenset(offered)
