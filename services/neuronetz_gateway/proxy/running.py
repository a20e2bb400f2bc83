"""The requests in flight in one proxy process, by key (for revocation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuronetz_gateway.proxy.exchange import Exchange

__all__ = ["RunningRequests"]


class RunningRequests:
    """The exchanges in flight in this process, by key id."""

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[int, set[Exchange]] = {}

    def add(self, ex: Exchange) -> None:
        """A request that verified and may now run."""
        self._by_key.setdefault(ex.identity.key_id, set()).add(ex)

    def discard(self, ex: Exchange) -> None:
        """The request ended (idempotent)."""
        running = self._by_key.get(ex.identity.key_id)
        if running is not None:
            running.discard(ex)
            if not running:
                del self._by_key[ex.identity.key_id]

    def key_ids(self, kind: str, ident: str) -> list[int]:
        """The running keys a ``kind:ident`` event may concern (``unknown``: all of them)."""
        if kind == "key":
            return [k for k, exs in self._by_key.items() if _any(exs).identity.key_prefix == ident]
        if kind == "tenant":
            return [
                k for k, exs in self._by_key.items() if str(_any(exs).identity.tenant_id) == ident
            ]
        return list(self._by_key)

    def end(self, key_id: int) -> int:
        """Revoke every running request of ``key_id``; how many there were."""
        running = list(self._by_key.get(key_id, ()))
        for ex in running:
            ex.revoke()
        return len(running)


def _any(exchanges: set[Exchange]) -> Exchange:
    return next(iter(exchanges))
