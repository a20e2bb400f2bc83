"""Keyed fingerprints: made under the current secret, checked under current or previous."""

from __future__ import annotations

import pytest

from neuronetz_gateway.domain.key_fingerprints import FingerprintKeys, Verdict, secret_kid
from neuronetz_gateway.domain.keys import generate_key

OLD = b"old-secret-" + b"o" * 32
NEW = b"new-secret-" + b"n" * 32


def test_a_fingerprint_names_its_secret_and_matches_only_its_key() -> None:
    key, other = generate_key().full, generate_key().full
    keys = FingerprintKeys(NEW)
    stored = keys.make(key)
    kid, _, mac = stored.partition(".")
    assert kid == secret_kid(NEW) and len(mac) == 64
    assert key not in stored and key[11:43] not in stored
    assert keys.check(stored, key) is Verdict.MATCH
    assert keys.check(stored, other) is Verdict.MISMATCH
    assert FingerprintKeys(OLD).make(key) != stored


def test_the_previous_secret_is_accepted_and_said_so() -> None:
    key = generate_key().full
    old_stored = FingerprintKeys(OLD).make(key)
    rotating = FingerprintKeys(NEW, OLD)
    assert rotating.check(old_stored, key) is Verdict.MATCH_PREVIOUS_SECRET
    assert rotating.check(old_stored, generate_key().full) is Verdict.MISMATCH
    assert rotating.make(key) == FingerprintKeys(NEW).make(key)  # new ones: current only
    # without the old secret, an old fingerprint decides nothing (Argon2 will)
    assert FingerprintKeys(NEW).check(old_stored, key) is Verdict.UNKNOWN
    # the same secret given twice rotates nothing
    assert FingerprintKeys(NEW, NEW).check(FingerprintKeys(NEW).make(key), key) is Verdict.MATCH


@pytest.mark.parametrize(
    "stored",
    [None, "", "abc", "x" * 73, secret_kid(NEW) + ":" + "0" * 64, "00000000." + "0" * 64],
)
def test_missing_malformed_or_foreign_fingerprints_are_unknown(stored: str | None) -> None:
    assert FingerprintKeys(NEW).check(stored, generate_key().full) is Verdict.UNKNOWN


def test_an_empty_current_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        FingerprintKeys(b"")
