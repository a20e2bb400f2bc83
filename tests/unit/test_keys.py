"""Key format: generation, parsing without I/O, checksum, fingerprints."""

from __future__ import annotations

import math
import string

import pytest

from neuronetz_gateway.domain.keys import (
    KEY_LENGTH,
    PREFIX_LENGTH,
    InvalidKeyFormat,
    fingerprint,
    generate_key,
    is_valid_prefix,
    parse_key,
)


def test_generated_key_has_the_documented_shape() -> None:
    key = generate_key()
    assert len(key.full) == KEY_LENGTH == 49
    assert key.full.startswith("nz_")
    assert key.prefix == key.full[:PREFIX_LENGTH]
    assert is_valid_prefix(key.prefix)
    assert parse_key(key.full) == key


def test_secret_carries_at_least_128_bits() -> None:
    secret_chars = KEY_LENGTH - PREFIX_LENGTH - 6
    assert secret_chars * math.log2(62) >= 128


def test_keys_do_not_repeat() -> None:
    keys = {generate_key().full for _ in range(2000)}
    assert len(keys) == 2000


def test_rotation_keeps_the_prefix() -> None:
    key = generate_key()
    rotated = generate_key(key.prefix)
    assert rotated.prefix == key.prefix
    assert rotated.full != key.full
    parse_key(rotated.full)


def test_repr_hides_the_secret() -> None:
    key = generate_key()
    assert key.full not in repr(key)
    assert key.full[PREFIX_LENGTH:] not in repr(key)


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "nz_",
        "Bearer nz_abc",
        "sk-" + "a" * 46,
        "nz_ABC12345" + "a" * 38,  # upper case in the public part
        "nz_abc1234-" + "a" * 38,
        "x" * 49,
        "nz_abc12345" + "a" * 39,  # too long
    ],
)
def test_malformed_keys_are_rejected(candidate: str) -> None:
    with pytest.raises(InvalidKeyFormat):
        parse_key(candidate)


def test_every_single_character_typo_is_caught() -> None:
    key = generate_key().full
    alphabet = string.ascii_letters + string.digits
    for position in range(PREFIX_LENGTH, KEY_LENGTH):
        for replacement in alphabet[:10]:
            if key[position] == replacement:
                continue
            typo = key[:position] + replacement + key[position + 1 :]
            with pytest.raises(InvalidKeyFormat):
                parse_key(typo)


def test_transposition_is_caught() -> None:
    key = generate_key().full
    for i in range(PREFIX_LENGTH, KEY_LENGTH - 7):
        if key[i] != key[i + 1]:
            swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
            with pytest.raises(InvalidKeyFormat):
                parse_key(swapped)


def test_fingerprint_depends_on_key_and_server_secret() -> None:
    key = generate_key().full
    a = fingerprint(key, b"s" * 32)
    assert a == fingerprint(key, b"s" * 32)
    assert a != fingerprint(key, b"t" * 32)
    assert a != fingerprint(generate_key().full, b"s" * 32)
    assert key not in a and len(a) == 64


def test_generate_rejects_a_bad_prefix() -> None:
    with pytest.raises(InvalidKeyFormat):
        generate_key("nz_BAD")
