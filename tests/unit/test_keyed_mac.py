"""The keyed HMAC state: the digests hmac.new makes, for every secret, past the cache's bound."""

from __future__ import annotations

import hashlib
import hmac

from neuronetz_gateway.domain.keyed_mac import hmac_sha256


def test_digests_are_hmac_new_ones_for_many_secrets_and_messages() -> None:
    messages = [b"", b"v1.payload", b"x" * 10_000]
    for round_ in range(2):  # the second round reuses (or, past the bound, re-keys) states
        for i in range(20):
            secret = f"secret-{i}".encode() * (1 + i % 5)
            for message in messages:
                expected = hmac.new(secret, message, hashlib.sha256)
                got = hmac_sha256(secret, message)
                assert got.digest() == expected.digest(), (round_, i, message[:10])
                assert got.hexdigest() == expected.hexdigest()


def test_a_message_never_leaks_into_the_next_mac() -> None:
    first = hmac_sha256(b"k", b"first").digest()
    assert hmac_sha256(b"k", b"second").digest() == hmac.new(b"k", b"second", "sha256").digest()
    assert hmac_sha256(b"k", b"first").digest() == first
