"""pack_evalsha: the bytes sent for EVALSHA, with key lists packed once (PackedKeys)."""

from __future__ import annotations

import hiredis

from neuronetz_gateway.adapters.redis_pipeline import PackedKeys, RedisArg, pack_evalsha

SHA = "0123456789abcdef0123456789abcdef01234567"


def _plain(keys: list[str], args: tuple[RedisArg, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(("EVALSHA", SHA, len(keys), *keys, *args))  # type: ignore[arg-type]
    return packed


def test_packed_keys_send_what_the_plain_list_sends() -> None:
    keys = [f"nz:{{t7}}:rpm:k{i}" for i in range(14)]
    args: tuple[RedisArg, ...] = ("reserve", 1796415582000, -1, "", b"raw\r\n", 0.5, "é")
    packed = PackedKeys(keys)
    assert packed == keys
    assert pack_evalsha(SHA, packed, args) == _plain(keys, args)
    # twice (the cached head) and with another key count
    assert pack_evalsha(SHA, packed, args) == _plain(keys, args)
    assert pack_evalsha(SHA, PackedKeys(keys[:3]), args) == _plain(keys[:3], args)


def test_plain_lists_empty_keys_and_no_args_are_packed_as_before() -> None:
    keys = ["a", "b"]
    assert pack_evalsha(SHA, keys, (1, "x")) == _plain(keys, (1, "x"))
    assert pack_evalsha(SHA, PackedKeys(keys), ()) == _plain(keys, ())
    assert pack_evalsha(SHA, PackedKeys([]), (1,)) == _plain([], (1,))
    # a list extended from packed keys (the limiter's marker) is a plain list again
    extended = [*PackedKeys(keys), "marker"]
    assert pack_evalsha(SHA, extended, (1,)) == _plain([*keys, "marker"], (1,))
