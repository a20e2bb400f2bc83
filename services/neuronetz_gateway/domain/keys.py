"""API key format: generation, parsing and fingerprints. Pure; no I/O.

A key is ``nz_`` + 8 public characters + 32 secret characters + a
6-character checksum::

    nz_abc12345 7Hq...(32)... 0aZ9xQ
    └─ prefix ─┘└── secret ──┘└check┘

The checksum (CRC32 of everything before it, base62) lets a mistyped or
random string be refused before any cache, database or hash work.
"""

from __future__ import annotations

import hmac
import secrets
import string
import zlib
from dataclasses import dataclass

from neuronetz_gateway.domain.keyed_mac import hmac_sha256

__all__ = [
    "KEY_LENGTH",
    "PREFIX_LENGTH",
    "InvalidKeyFormat",
    "ParsedKey",
    "fingerprint",
    "generate_key",
    "is_valid_prefix",
    "parse_key",
]

_SCHEME = "nz_"
_PUBLIC_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
_PUBLIC_CHARS = 8
_SECRET_CHARS = 32  # 32 * log2(62) ~= 190 bits
_CHECK_CHARS = 6  # 62**6 > 2**32: any CRC32 fits

PREFIX_LENGTH = len(_SCHEME) + _PUBLIC_CHARS
KEY_LENGTH = PREFIX_LENGTH + _SECRET_CHARS + _CHECK_CHARS
_PUBLIC_SET = frozenset(_PUBLIC_ALPHABET)
_SECRET_SET = frozenset(_SECRET_ALPHABET)


class InvalidKeyFormat(ValueError):
    """The string is not a well-formed key (shape, alphabet or checksum)."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key that passed the format and checksum checks."""

    prefix: str
    full: str

    def __repr__(self) -> str:  # never show the secret part
        return f"ParsedKey(prefix={self.prefix!r})"


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(_SECRET_ALPHABET[rem])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_CHARS)


def generate_key(prefix: str | None = None) -> ParsedKey:
    """A new random key; pass ``prefix`` to keep an identity's prefix on rotation."""
    if prefix is None:
        prefix = _SCHEME + "".join(secrets.choice(_PUBLIC_ALPHABET) for _ in range(_PUBLIC_CHARS))
    elif not is_valid_prefix(prefix):
        raise InvalidKeyFormat("malformed prefix")
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_CHARS))
    body = prefix + secret
    return ParsedKey(prefix=prefix, full=body + _checksum(body))


def is_valid_prefix(prefix: str) -> bool:
    """True for ``nz_`` followed by 8 public characters."""
    return (
        len(prefix) == PREFIX_LENGTH
        and prefix.startswith(_SCHEME)
        and all(c in _PUBLIC_SET for c in prefix[len(_SCHEME) :])
    )


def parse_key(candidate: str) -> ParsedKey:
    """Check shape, alphabet and checksum; raise :class:`InvalidKeyFormat` otherwise."""
    if len(candidate) != KEY_LENGTH or not candidate.startswith(_SCHEME):
        raise InvalidKeyFormat("bad length or scheme")
    prefix = candidate[:PREFIX_LENGTH]
    if not is_valid_prefix(prefix):
        raise InvalidKeyFormat("bad prefix")
    body, check = candidate[:-_CHECK_CHARS], candidate[-_CHECK_CHARS:]
    if not all(c in _SECRET_SET for c in candidate[PREFIX_LENGTH:]):
        raise InvalidKeyFormat("bad alphabet")
    if not hmac.compare_digest(_checksum(body), check):
        raise InvalidKeyFormat("bad checksum")
    return ParsedKey(prefix=prefix, full=candidate)


def fingerprint(full_key: str, server_secret: bytes) -> str:
    """HMAC-SHA256 of the full key under the server secret: the cache key, never the key."""
    return hmac_sha256(server_secret, full_key.encode()).hexdigest()
