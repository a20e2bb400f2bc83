"""The native ``/api/*`` surface: its codec (body checks, caps, pass-through) and listings.

The body Ollama receives is re-encoded from the object the proxy checked,
so what was checked is exactly what runs: Go's JSON decoder matches keys
case-insensitively (``"Model"``, Kelvin-sign ``keep_alive``) and merges a
repeated ``options`` object, either of which would otherwise slip a model
or an option past the checks. Field names that are not plain lower-case
where Ollama decodes a struct (top level, messages, tools, options) are
refused (:mod:`neuronetz_gateway.domain.body_keys`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from neuronetz_gateway.domain.accounting import (
    CapRefusal,
    apply_native_caps,
    decode_final_counts,
    estimate_native_prompt,
    native_num_predict,
)
from neuronetz_gateway.domain.body_keys import case_variant_field
from neuronetz_gateway.domain.identity import OptionCaps
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.domain.options import KeepAliveWindow
from neuronetz_gateway.proxy.asgi import Receive, Scope, Send
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.pipeline import Answer, TokenPlan
from neuronetz_gateway.proxy.refusals import Refusal
from neuronetz_gateway.proxy.relay import NativeFrames, forward, read_whole, upstream_refusal

__all__ = [
    "NativeCodec",
    "parse_object",
    "running_models",
    "tags",
    "version",
]

_JSON = b"application/json; charset=utf-8"
_NDJSON = "application/x-ndjson"
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class _Listing(msgspec.Struct):
    models: list[dict[str, Any]] = msgspec.field(default_factory=list)


_listing_decoder = msgspec.json.Decoder(_Listing)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        value = _decoder.decode(body)
    except UnicodeDecodeError:
        raise Refusal(400, "invalid_request", "the request body is not valid UTF-8") from None
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        # ValidationError: a number beyond float64 (1e400); RecursionError:
        # nesting deeper than any real request (a 100k-deep array)
        raise Refusal(400, "invalid_request", "the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise Refusal(400, "invalid_request", "the request body must be a JSON object")
    field = case_variant_field(value)
    if field is not None:
        raise Refusal(
            400,
            "invalid_request",
            f"unknown field {field!r}: field names are lower-case (Ollama would read "
            "another case as the same field)",
            param=field,
        )
    return value


def _set_num_predict(body: dict[str, Any], value: int) -> None:
    options = body.get("options")
    if options is None:
        body["options"] = {"num_predict": value}
    elif isinstance(options, dict):
        options["num_predict"] = value
    # any other ``options`` is malformed: Ollama answers it with its own 400


_TOKENS: dict[str, TokenPlan] = {"show": "none", "embed": "prompt", "embeddings": "prompt"}


class NativeCodec:
    """``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/embeddings``, ``/api/show``.

    The body is checked and re-encoded, never translated; a stream goes back
    byte for byte (:class:`~neuronetz_gateway.proxy.relay.NativeFrames`).
    """

    __slots__ = ("route", "tokens", "upstream_path")

    def __init__(self, route: str, upstream_path: str) -> None:
        self.route = route
        self.upstream_path = upstream_path
        self.tokens: TokenPlan = _TOKENS.get(route, "output")

    def decode(self, raw: bytes) -> dict[str, Any]:
        return parse_object(raw)

    def model(self, request: dict[str, Any]) -> str:
        model = request.get("model")
        if self.route == "show" and not model:
            model = request.get("name")  # Ollama still reads the deprecated field
        if not isinstance(model, str) or not model:
            raise Refusal(400, "invalid_request", "'model' is required and must be a string")
        return model

    def cap(self, request: dict[str, Any], caps: OptionCaps, window: KeepAliveWindow) -> int | None:
        try:
            apply_native_caps(request, caps, window)
        except CapRefusal as exc:
            raise Refusal(400, "invalid_request", exc.message, param=exc.param) from None
        return native_num_predict(request)

    def estimate(self, request: dict[str, Any]) -> int:
        return estimate_native_prompt(self.route, request)

    def set_output(self, request: dict[str, Any], tokens: int) -> None:
        _set_num_predict(request, tokens)

    def encode(self, request: dict[str, Any]) -> bytes:
        return _encoder.encode(request)

    def stream_asked(self, request: dict[str, Any]) -> bool:
        return self.tokens == "output" and request.get("stream") is not False

    def session(self, request: dict[str, Any]) -> None:
        return None  # Ollama's API names no session

    def streams(self, request: dict[str, Any], content_type: str) -> bool:
        return content_type.startswith(_NDJSON)

    def frames(self, request: dict[str, Any], request_id: str, estimate: int) -> NativeFrames:
        return NativeFrames()

    def answer(
        self,
        request: dict[str, Any],
        data: bytes,
        content_type: str,
        request_id: str,
        *,
        keep_text: bool,
    ) -> Answer:
        counts: tuple[int, int] | None = (0, 0)  # show: no tokens
        if self.route != "show":
            final = decode_final_counts(data)
            counts = None  # e.g. /api/embeddings, which reports no count: estimated
            if final is not None and final.prompt_eval_count is not None:
                counts = (final.prompt_eval_count, final.eval_count or 0)
        text = data.decode("utf-8", "replace") if keep_text else None
        return Answer(data, content_type.encode("latin-1"), counts, text)


async def tags(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /api/tags``: the installed models this key may use."""
    catalogue = await ex.catalogue()
    effective = catalogue.effective(ex.identity.models)
    models = [entry for name, entry in catalogue.entries.items() if name in effective]
    await ex.respond(send, 200, _encoder.encode({"models": models}), _JSON)


async def running_models(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /api/ps``: the loaded models, filtered to the ones this key may use."""
    catalogue = await ex.catalogue()
    effective = catalogue.effective(ex.identity.models)
    upstream = await forward(ex, "/api/ps", None)
    if upstream.status != 200:
        raise await upstream_refusal(ex, upstream)
    data = await read_whole(ex, upstream, receive)
    try:
        listing = _listing_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise Refusal(502, "upstream_error", "the model server sent an unreadable list") from None
    models = [m for m in listing.models if _canonical_entry(m) in effective]
    await ex.respond(send, 200, _encoder.encode({"models": models}), _JSON)


def _canonical_entry(entry: dict[str, Any]) -> str:
    name = entry.get("name") or entry.get("model")
    return canonical_model(name) if isinstance(name, str) else ""


async def version(ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /api/version``, passed through."""
    upstream = await forward(ex, "/api/version", None)
    if upstream.status != 200:
        raise await upstream_refusal(ex, upstream)
    data = await read_whole(ex, upstream, receive)
    await ex.respond(send, 200, data, _JSON)
