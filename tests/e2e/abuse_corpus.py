"""A red-team corpus of body and option spellings, one list of probes for every surface.

Each probe is (name, path, raw body bytes). What a probe must never get: a
5xx, a traceback, or a model request reaching Ollama with an output bound
outside the key's cap or a ``keep_alive`` outside the window. Built from the
holes issue 10 lists (``num_predict`` 0 / fractions, ``keep_alive`` that
unloads or pins, case-variant keys Go would decode, non-UTF-8 bodies) and
the spellings around them.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["PROBES", "Probe"]

Probe = tuple[str, str, bytes]

KELVIN = "\u212a"
LONG_S = "\u017f"
BIG = "word " * 2400

# One well-formed body per model route.
BASES: dict[str, dict[str, Any]] = {
    "/api/chat": {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                  "stream": False},
    "/api/generate": {"model": "llama3.2", "prompt": "hi", "stream": False},
    "/api/embed": {"model": "llama3.2", "input": "hi"},
    "/api/embeddings": {"model": "llama3.2", "prompt": "hi"},
    "/api/show": {"model": "llama3.2"},
    "/v1/chat/completions": {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "llama3.2", "prompt": "hi"},
    "/v1/embeddings": {"model": "llama3.2", "input": "hi"},
    "/v1/responses": {"model": "llama3.2", "input": "hi"},
    "/v1/messages": {"model": "llama3.2", "max_tokens": 8,
                     "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "llama3.2",
                                  "messages": [{"role": "user", "content": "hi"}]},
}  # fmt: skip

NUM_PREDICT: list[Any] = [0, 0.5, 1e-9, -1, -2, -0.5, 1e300, 10**30, 2**31, 2**63, 16.9, "16",
                          True, None, [1]]  # fmt: skip
KEEP_ALIVE: list[Any] = ["1ns", 0.5, "999999h", 1e300, 0, "0", "0s", -1, "-1m", "59s", "25h",
                         "5 m", " 5m", "5M", "1d", True, [], {}, 86401, 10**30]  # fmt: skip
MAX_TOKENS: list[Any] = [0, 0.5, -1, 1e-9, 1e300, 10**30, "16", True]

# Byte-level spellings every route gets.
RAW_BODIES: dict[str, bytes] = {
    "latin-1 text": b'{"model":"llama3.2","prompt":"caf\xe9","input":"caf\xe9","messages":'
                    b'[{"role":"user","content":"caf\xe9"}]}',
    "truncated UTF-8": b'{"model":"llama3.2","prompt":"\xc3"}',
    "encoded surrogate": b'{"model":"\xed\xa0\x80"}',
    "leading BOM": b'\xef\xbb\xbf{"model":"llama3.2"}',
    "UTF-16": '{"model":"llama3.2"}'.encode("utf-16"),
    "number past float64": b'{"model":"llama3.2","options":{"num_predict":1e400}}',
    "NaN literal": b'{"model":"llama3.2","temperature":NaN}',
    "deep nesting": b'{"model":"llama3.2","x":' + b"[" * 20000 + b"]" * 20000 + b"}",
    "array": b"[]",
    "string": b'"llama3.2"',
    "null": b"null",
    "empty": b"",
    "trailing garbage": b'{"model":"llama3.2"} x',
    "NUL byte": b'{"model":"llama3.2\x00"}',
}  # fmt: skip


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _native_option_probes(path: str, base: dict[str, Any]) -> list[Probe]:
    probes = []
    for value in NUM_PREDICT:
        probes.append(
            (f"num_predict={value!r}", path, _dump({**base, "options": {"num_predict": value}}))
        )
    for value in KEEP_ALIVE:
        probes.append((f"keep_alive={value!r}", path, _dump({**base, "keep_alive": value})))
    variants = {
        "Model": {**{k: v for k, v in base.items() if k != "model"}, "Model": "llama3.2"},
        "Options": {**base, "Options": {"num_predict": 0}},
        "options.Num_Predict": {**base, "options": {"Num_Predict": 0}},
        "options.NUM_CTX": {**base, "options": {"NUM_CTX": 10**6}},
        f"{KELVIN}eep_alive": {**base, f"{KELVIN}eep_alive": 0},
        f"{LONG_S}ystem": {**base, f"{LONG_S}ystem": BIG},
        "duplicate options": None,
        "num_ctx=0": {**base, "options": {"num_ctx": 0}},
        "num_ctx=1e300": {**base, "options": {"num_ctx": 1e300}},
        "options=[]": {**base, "options": []},
    }
    for name, body in variants.items():
        if body is None:
            raw = _dump(base)[:-1] + b',"options":{"num_predict":4},"options":{"num_predict":0}}'
            probes.append((name, path, raw))
        else:
            probes.append((name, path, _dump(body)))
    if "messages" in base:
        for key in ("Content", "CONTENT", "Images", "Role"):
            message = {"role": "user", "content": "hi", key: BIG if key != "Images" else ["aGk="]}
            probes.append((f"messages[0].{key}", path, _dump({**base, "messages": [message]})))
    return probes


def _translated_probes(path: str, base: dict[str, Any]) -> list[Probe]:
    probes = []
    field = {"/v1/responses": "max_output_tokens"}.get(path, "max_tokens")
    if path.endswith("count_tokens") or path.endswith("embeddings"):
        field = ""
    for value in MAX_TOKENS if field else []:
        probes.append((f"{field}={value!r}", path, _dump({**base, field: value})))
    for key in ("Model", "Messages", "Max_Tokens", "Options", "Keep_Alive"):
        probes.append((f"case {key}", path, _dump({**base, key: 0})))
    probes.append(("options smuggled", path, _dump({**base, "options": {"num_predict": 0}})))
    probes.append(("keep_alive smuggled", path, _dump({**base, "keep_alive": 0})))
    if "messages" in base:
        message = {"role": "user", "content": "hi", "Content": BIG}
        probes.append(("messages[0].Content", path, _dump({**base, "messages": [message]})))
    return probes


#: The routes that get every option spelling (the rest get the byte-level ones and a few).
_OPTION_ROUTES = ("/api/chat", "/api/generate")
_FEW_RAW = ("latin-1 text", "number past float64", "deep nesting", "array", "empty")


def _build() -> list[Probe]:
    probes: list[Probe] = []
    for path, base in BASES.items():
        raw_names = RAW_BODIES if path in ("/api/chat", "/v1/chat/completions") else _FEW_RAW
        for name in raw_names:
            probes.append((name, path, RAW_BODIES[name]))
        if path in _OPTION_ROUTES:
            probes += _native_option_probes(path, base)
        elif path.startswith("/v1/"):
            probes += _translated_probes(path, base)
    return probes


PROBES: list[Probe] = _build()
