"""The route table: which method + path pairs the gateway proxies, and how. Pure.

One table (:data:`ROUTES`: id, method, path, surface, codec, upstream path)
serves both services: auth classifies requests with it, the proxy builds
its handlers from it (``proxy/routes.py``).

Default deny. The decision is taken from the method and the *raw*
(still percent-escaped) request URI that Caddy forwards, in this order:

1. **Blocked** (403): the path is normalised as aggressively as any decoder
   or path cleaner between the client and Ollama could (repeated
   percent-decoding, backslashes, case, Unicode compatibility forms, ``;``
   parameters, repeated slashes, dot segments, trailing dots and spaces),
   and refused if it names a hard-blocked route (``/api/pull``,
   ``/api/push``, ``/api/create``, ``/api/copy``, ``/api/delete``,
   ``/api/blobs`` and anything below them). This runs before the key is
   looked at, so every caller gets the same 403.
2. **Bad request** (400): control characters (NUL, CR, LF...), Unicode that
   does not reduce to ASCII, undecodable or overlong escapes, an escape that
   keeps decoding, a relative or absolute-form target.
3. **Allowed**: only if the raw path is *exactly* one of the canonical
   paths below (so no spelling that a cleaner might turn into something else
   is ever let through), with the right method, else **405** (with the
   allowed methods) for a known path or **404** for anything else.

``GET /v1/models/{model}`` is the one pattern: the model segment may be
percent-encoded (``llama3.2%3Alatest``, ``library%2Fx%3Atag``) or literal
(``library/x:tag``); once decoded it must be a plain model reference
(:data:`MODEL_ID_CHARS`, at most three ``/``-separated non-dot parts, no
``%`` left), else 400. A query string is accepted on GET routes (and
ignored) and refused (400) on POST routes, whose input is the body, except
where a client sends one (``POST /v1/messages?beta=true`` from Claude Code):
those routes accept and ignore it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote_to_bytes

from neuronetz_gateway.domain.dialect import ANTHROPIC, NATIVE, OPENAI, Surface, surface_of

__all__ = [
    "BLOCKED_ROUTES",
    "MODEL_ID_CHARS",
    "MODEL_ROUTE",
    "ROUTES",
    "SURFACE_BY_ID",
    "Outcome",
    "Route",
    "RouteMatch",
    "classify",
    "normalise_for_block_check",
]


@dataclass(frozen=True, slots=True)
class Route:
    """One proxied route: the one table auth and proxy both read.

    ``id`` names it in the identity token, the audit row and the metrics;
    ``surface`` is its error dialect; ``codec`` what serves it in the proxy
    (a surface's codec for a model call, or the gateway's own answer, see
    ``proxy/routes.py``); ``upstream`` the fixed Ollama path it forwards to
    (``None``: answered by the gateway itself). ``query``: a query string is
    accepted (and ignored) on this POST route.
    """

    id: str
    method: str
    path: str
    surface: Surface
    codec: str
    upstream: str | None = None
    query: bool = False


ROUTES: tuple[Route, ...] = (
    Route("generate", "POST", "/api/generate", NATIVE, "native", "/api/generate"),
    Route("chat", "POST", "/api/chat", NATIVE, "native", "/api/chat"),
    Route("embed", "POST", "/api/embed", NATIVE, "native", "/api/embed"),
    Route("embeddings", "POST", "/api/embeddings", NATIVE, "native", "/api/embeddings"),
    Route("show", "POST", "/api/show", NATIVE, "native", "/api/show"),
    Route("tags", "GET", "/api/tags", NATIVE, "native.tags"),
    Route("ps", "GET", "/api/ps", NATIVE, "native.ps", "/api/ps"),
    Route("version", "GET", "/api/version", NATIVE, "native.version", "/api/version"),
    Route("key", "GET", "/api/key", NATIVE, "key_info"),
    Route(
        "v1.chat.completions", "POST", "/v1/chat/completions", OPENAI, "openai.chat", "/api/chat"
    ),
    Route(
        "v1.completions", "POST", "/v1/completions", OPENAI, "openai.completions", "/api/generate"
    ),
    Route("v1.embeddings", "POST", "/v1/embeddings", OPENAI, "openai.embeddings", "/api/embed"),
    Route("v1.models", "GET", "/v1/models", OPENAI, "openai.models"),
    Route("v1.key", "GET", "/v1/key", OPENAI, "key_info"),
    Route("v1.responses", "POST", "/v1/responses", OPENAI, "openai.responses", "/api/chat"),
    Route(
        "v1.messages", "POST", "/v1/messages", ANTHROPIC, "anthropic.messages", "/api/chat",
        query=True,
    ),
    Route(
        "v1.messages.count_tokens", "POST", "/v1/messages/count_tokens", ANTHROPIC,
        "anthropic.count_tokens", query=True,
    ),
)  # fmt: skip
#: ``GET /v1/models/{model}``, the one pattern (see :func:`classify`).
MODEL_ROUTE = Route("v1.model", "GET", "/v1/models/{model}", OPENAI, "openai.model")
_MODEL_ROUTE = MODEL_ROUTE
_MODEL_PATH_PREFIX = "/v1/models/"
#: Each route's dialect by id (a proxy answering before it parsed anything needs it).
SURFACE_BY_ID: dict[str, Surface] = {r.id: r.surface for r in (*ROUTES, MODEL_ROUTE)}

BLOCKED_ROUTES = ("pull", "push", "create", "copy", "delete", "blobs")  # under /api/
_BLOCKED = frozenset(BLOCKED_ROUTES)

# path -> {method: route}; exact, case-sensitive, canonical spellings only
_BY_PATH: dict[str, dict[str, Route]] = {}
for _route in ROUTES:
    _BY_PATH.setdefault(_route.path, {})[_route.method] = _route

MODEL_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-/")
_MODEL_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")
_MAX_MODEL_LENGTH = 256
_MAX_DECODE_ROUNDS = 4  # %25252570 is already absurd; more means "keeps decoding" -> 400
_MAX_URI_LENGTH = 4096


class Outcome(StrEnum):
    """What the route table says about a request."""

    ALLOWED = "allowed"
    BLOCKED = "blocked"  # 403
    BAD_REQUEST = "bad_request"  # 400
    NOT_FOUND = "not_found"  # 404
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The classification of one request (``route`` set only when allowed)."""

    outcome: Outcome
    surface: Surface
    route: Route | None = None
    allow: tuple[str, ...] = ()  # for 405: the methods the path takes
    model: str | None = None  # for v1.model: the decoded model id


class _Rejected(Exception):
    """The path cannot be read safely: answer 400."""


def _decode_fully(path: str) -> str:
    """Percent-decode until nothing changes, as UTF-8; reject what never settles."""
    current = path
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in current:
            return current
        raw = unquote_to_bytes(current)
        try:
            decoded = raw.decode("utf-8")  # strict: overlong forms (%c0%af) are invalid
        except UnicodeDecodeError:
            raise _Rejected("undecodable escape") from None
        if decoded == current:  # a stray '%' that is not an escape
            return current
        current = decoded
    if "%" in current and unquote_to_bytes(current) != current.encode():
        raise _Rejected("escape keeps decoding")
    return current


def _check_characters(text: str) -> str:
    """Refuse control characters; fold Unicode compatibility forms to ASCII or refuse."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _Rejected("control character")
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        if not text.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise _Rejected("non-ASCII path")
    return text


def normalise_for_block_check(path: str) -> str:
    """The most-cleaned form of ``path`` any HTTP stack could produce (raises on garbage).

    Used only to decide whether a request is blocked: over-normalising can
    only block more, because allowing needs the exact canonical raw path.
    """
    text = _check_characters(_decode_fully(path))
    text = text.replace("\\", "/").lower()
    # a decoded '?' or '#' ends the path for some parsers
    for stop in ("?", "#"):
        text = text.split(stop, 1)[0]
    segments: list[str] = []
    for raw_segment in text.split("/"):
        segment = raw_segment.split(";", 1)[0].strip()
        if segment and set(segment) == {"."}:
            if len(segment) > 1 and segments:  # ".." (and "...", as some cleaners do)
                segments.pop()
            continue
        segment = segment.rstrip(". ")  # Windows-style trailing dots and spaces
        if segment:
            segments.append(segment)
    return "/" + "/".join(segments)


def _is_blocked(normalised: str) -> bool:
    parts = normalised.split("/", 3)  # "", "api", name, rest
    return len(parts) >= 3 and parts[1] == "api" and parts[2] in _BLOCKED


def _model_id(raw_segment: str) -> str | None:
    """The decoded model id of ``/v1/models/{model}``, or ``None`` if it is not a plain one."""
    try:
        model = unquote_to_bytes(raw_segment).decode("ascii")
    except UnicodeDecodeError:
        return None
    if not model or len(model) > _MAX_MODEL_LENGTH or not set(model) <= MODEL_ID_CHARS:
        return None
    parts = model.split("/")
    if len(parts) > 3 or not all(_MODEL_PART.fullmatch(p) for p in parts):
        return None
    return model


def classify(method: str, uri: str) -> RouteMatch:
    """Classify a request by its method and raw request URI (``path[?query]``)."""
    path, has_query, _query = uri.partition("?")
    routes = _BY_PATH.get(path)
    if routes is not None:  # fast path: an exact canonical path cannot normalise to a block
        route = routes.get(method)
        surface = next(iter(routes.values())).surface
        if route is None:
            return RouteMatch(Outcome.METHOD_NOT_ALLOWED, surface, allow=tuple(sorted(routes)))
        if has_query and route.method != "GET" and not route.query:
            return RouteMatch(Outcome.BAD_REQUEST, surface)
        return RouteMatch(Outcome.ALLOWED, surface, route=route)
    return _classify_slow(method, path, bool(has_query))


def _classify_slow(method: str, path: str, has_query: bool) -> RouteMatch:
    fallback_surface = surface_of(path)
    if len(path) > _MAX_URI_LENGTH:
        return RouteMatch(Outcome.BAD_REQUEST, fallback_surface)
    try:
        normalised = normalise_for_block_check(path)
    except _Rejected:
        return RouteMatch(Outcome.BAD_REQUEST, fallback_surface)
    surface = surface_of(normalised)
    if _is_blocked(normalised):
        return RouteMatch(Outcome.BLOCKED, surface)
    if not path.startswith("/"):  # absolute-form or relative targets are never ours
        return RouteMatch(Outcome.BAD_REQUEST, surface)
    if path.startswith(_MODEL_PATH_PREFIX):
        model = _model_id(path[len(_MODEL_PATH_PREFIX) :])
        if model is None:
            return RouteMatch(Outcome.BAD_REQUEST, OPENAI)
        if method != _MODEL_ROUTE.method:
            return RouteMatch(Outcome.METHOD_NOT_ALLOWED, OPENAI, allow=(_MODEL_ROUTE.method,))
        return RouteMatch(Outcome.ALLOWED, OPENAI, route=_MODEL_ROUTE, model=model)
    return RouteMatch(Outcome.NOT_FOUND, surface)
