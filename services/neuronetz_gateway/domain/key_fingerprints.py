"""Keyed fingerprints of API keys, stored beside their Argon2id hashes. Pure; no I/O.

Argon2id stays the verifier of record; the fingerprint lets the auth service
decide a key it has verified once without Argon2, right *or wrong*, so a
flood of wrong secrets on a known prefix costs what an unknown prefix costs
(one indexed lookup) and spends none of the owner's Argon2 budget.

Stored form: ``<kid>.<mac>``::

    kid  8 hex characters naming the server secret the fingerprint was made
         under: HMAC-SHA256(secret, "nz-key-fingerprint-kid-v1"), cut
    mac  HMAC-SHA256(secret, "nz-key-fingerprint-v1" NUL full key), hex

The label keeps it distinct from the verified-key cache's key (an HMAC of the
bare key), so a database row never names a Redis entry. The ``kid`` tells a
fingerprint made under a secret this process no longer knows (after a
rotation, or by a CLI run with another secret) from a wrong key: such a
fingerprint is *unknown*, and the key falls back to Argon2, never to a refusal.
"""

from __future__ import annotations

import enum
import hashlib
import hmac

__all__ = ["FingerprintKeys", "Verdict", "secret_kid"]

_MAC_LABEL = b"nz-key-fingerprint-v1\x00"
_KID_LABEL = b"nz-key-fingerprint-kid-v1"
_KID_CHARS = 8
_MAC_CHARS = 64


class Verdict(enum.Enum):
    """What a stored fingerprint says about a presented key."""

    MATCH = "match"  # made under the current secret, and it is this key
    MATCH_PREVIOUS_SECRET = "match_previous_secret"  # noqa: S105 - a label: this key, old secret
    MISMATCH = "mismatch"  # made under a secret we hold, and it is another key
    UNKNOWN = "unknown"  # none stored, malformed, or made under a secret we do not hold


def secret_kid(secret: bytes) -> str:
    """The public name of a server secret (it reveals nothing about the secret)."""
    return hmac.new(secret, _KID_LABEL, hashlib.sha256).hexdigest()[:_KID_CHARS]


def _mac(secret: bytes, full_key: str) -> str:
    return hmac.new(secret, _MAC_LABEL + full_key.encode(), hashlib.sha256).hexdigest()


class FingerprintKeys:
    """The server secrets fingerprints are made and checked under.

    New fingerprints use ``current``; ``previous`` (the secret being rotated
    out, ``NZ_GATEWAY_SECRET_PREVIOUS``) is still accepted, so a key stays
    decidable without Argon2 until it is re-fingerprinted under ``current``.
    """

    __slots__ = ("_current", "_current_kid", "_previous", "_previous_kid")

    def __init__(self, current: bytes, previous: bytes | None = None) -> None:
        if not current:
            raise ValueError("the current secret must not be empty")
        self._current = current
        self._current_kid = secret_kid(current)
        if previous and secret_kid(previous) != self._current_kid:
            self._previous: bytes | None = previous
            self._previous_kid: str | None = secret_kid(previous)
        else:  # none, or the same secret twice: nothing is being rotated
            self._previous = None
            self._previous_kid = None

    def make(self, full_key: str) -> str:
        """The fingerprint to store for ``full_key``, under the current secret."""
        return f"{self._current_kid}.{_mac(self._current, full_key)}"

    def check(self, stored: str | None, full_key: str) -> Verdict:
        """Compare ``stored`` with ``full_key`` (constant time in the key)."""
        if not stored or len(stored) != _KID_CHARS + 1 + _MAC_CHARS:
            return Verdict.UNKNOWN
        kid, dot, mac = stored[:_KID_CHARS], stored[_KID_CHARS], stored[_KID_CHARS + 1 :]
        if dot != ".":
            return Verdict.UNKNOWN
        if kid == self._current_kid:
            secret, verdict = self._current, Verdict.MATCH
        elif self._previous is not None and kid == self._previous_kid:
            secret, verdict = self._previous, Verdict.MATCH_PREVIOUS_SECRET
        else:
            return Verdict.UNKNOWN
        if hmac.compare_digest(_mac(secret, full_key), mac):
            return verdict
        return Verdict.MISMATCH
