"""Argon2id hashing off the event loop, with bounded concurrency.

OWASP's Argon2id parameters (m=19 MiB, t=2, p=1): ~20 ms a verification
here. Verification runs in a thread (argon2-cffi releases the GIL) behind a
semaphore, so a flood of wrong keys cannot take every core.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["KeyHasher"]

_OWASP_TIME_COST = 2
_OWASP_MEMORY_KIB = 19 * 1024
_OWASP_PARALLELISM = 1


class KeyHasher:
    """Hash and verify key secrets with Argon2id; counts verifications for metrics."""

    def __init__(
        self,
        max_concurrency: int = 2,
        *,
        time_cost: int = _OWASP_TIME_COST,
        memory_cost: int = _OWASP_MEMORY_KIB,
        parallelism: int = _OWASP_PARALLELISM,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )
        self._slots = asyncio.Semaphore(max_concurrency)
        self.verifications = 0

    def hash(self, secret: str) -> str:
        """An Argon2id hash of ``secret`` (blocking; CLI and tests use it directly)."""
        return self._hasher.hash(secret)

    def verify_blocking(self, stored_hash: str, secret: str) -> bool:
        """Blocking verify: True on a match, False on a mismatch or a bad hash."""
        self.verifications += 1
        try:
            return self._hasher.verify(stored_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, stored_hash: str, secret: str) -> bool:
        """Verify in a worker thread, at most ``max_concurrency`` at a time."""
        async with self._slots:
            return await asyncio.to_thread(self.verify_blocking, stored_hash, secret)

    def needs_rehash(self, stored_hash: str) -> bool:
        """Whether ``stored_hash`` was made with weaker parameters than ours."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True
