"""Backends (Ollama servers) as the operator defines them, and the one used when none is.

A backend has a unique name, a base URL, its slots (the requests it runs at
once: its ``OLLAMA_NUM_PARALLEL``), a weight for routing, and a state:
``active`` takes new requests, ``draining`` finishes its running ones and
takes no new ones (``backend drain`` / ``backend enable``). With no backend
defined, ``NZ_OLLAMA_URL`` with ``NZ_OLLAMA_SLOTS`` is the one backend,
named :data:`DEFAULT_BACKEND` (the name the metrics already use for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from neuronetz_gateway.domain.errors import InvalidInput
from neuronetz_gateway.domain.policy import check_name

__all__ = [
    "DEFAULT_BACKEND",
    "MAX_SLOTS",
    "MAX_WEIGHT",
    "BackendSpec",
    "BackendState",
    "check_slots",
    "check_weight",
    "normalised_url",
]

DEFAULT_BACKEND = "default"
MAX_SLOTS = 4096
MAX_WEIGHT = 1000


class BackendState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend as configured (what every proxy replica loads)."""

    name: str
    url: str
    slots: int
    weight: int = 1
    state: BackendState = BackendState.ACTIVE

    @property
    def accepts_new(self) -> bool:
        """Whether new requests may go to it (a draining one only finishes its own)."""
        return self.state is BackendState.ACTIVE

    @classmethod
    def checked(
        cls,
        name: str,
        url: str,
        slots: int,
        weight: int = 1,
        state: BackendState = BackendState.ACTIVE,
    ) -> BackendSpec:
        """A spec from operator input; :class:`InvalidInput` names what is wrong."""
        check_name("backend", name)
        if name != name.strip():
            raise InvalidInput("backend name must not start or end with spaces")
        check_slots(slots)
        check_weight(weight)
        return cls(name, normalised_url(url), slots, weight, state)


def normalised_url(url: str) -> str:
    """An Ollama base URL: ``http(s)://host[:port][/path]``, without a trailing slash."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError for a port out of range or not a number
    except ValueError:
        raise InvalidInput(f"backend url {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"backend url must be http:// or https:// with a host, got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidInput("backend url must not carry a query, a fragment or credentials")
    del port
    return text.rstrip("/")


def check_slots(slots: int) -> None:
    if not 1 <= slots <= MAX_SLOTS:
        raise InvalidInput(f"slots must be between 1 and {MAX_SLOTS}, got {slots}")


def check_weight(weight: int) -> None:
    if not 1 <= weight <= MAX_WEIGHT:
        raise InvalidInput(f"weight must be between 1 and {MAX_WEIGHT}, got {weight}")
