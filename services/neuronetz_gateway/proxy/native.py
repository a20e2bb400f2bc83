"""The native ``/api/*`` surface: body checks, caps, and pass-through relays.

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
    plan_output,
    token_room,
)
from neuronetz_gateway.domain.body_keys import case_variant_field
from neuronetz_gateway.domain.models import canonical_model
from neuronetz_gateway.domain.options import KeepAliveWindow
from neuronetz_gateway.proxy.asgi import BodyTooLarge, Receive, Scope, Send, read_body
from neuronetz_gateway.proxy.exchange import Exchange
from neuronetz_gateway.proxy.refusals import ClientLeft, Refusal
from neuronetz_gateway.proxy.relay import forward, read_whole, relay_ndjson, upstream_refusal

__all__ = [
    "model_request",
    "parse_object",
    "read_request_body",
    "running_models",
    "tags",
    "version",
]

_JSON = b"application/json; charset=utf-8"
_NDJSON = "application/x-ndjson"
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
#: Routes whose answers carry no generated tokens.
_NO_OUTPUT = frozenset({"embed", "embeddings", "show"})


class _Listing(msgspec.Struct):
    models: list[dict[str, Any]] = msgspec.field(default_factory=list)


_listing_decoder = msgspec.json.Decoder(_Listing)


async def read_request_body(ex: Exchange, scope: Scope, receive: Receive) -> bytes:
    """The request body within ``max_body_bytes`` (413 past it)."""
    limit = ex.ctx.settings.max_body_bytes
    try:
        body = await read_body(scope, receive, limit)
    except BodyTooLarge:
        raise Refusal(413, "request_too_large", f"the request body exceeds {limit} bytes") from None
    if body is None:
        raise ClientLeft
    return body


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


def _model_of(route: str, body: dict[str, Any]) -> str:
    model = body.get("model")
    if route == "show" and not model:
        model = body.get("name")  # Ollama still reads the deprecated field
    if not isinstance(model, str) or not model:
        raise Refusal(400, "invalid_request", "'model' is required and must be a string")
    return model


async def model_request(
    ex: Exchange, scope: Scope, receive: Receive, send: Send, path: str
) -> None:
    """``generate``, ``chat``, ``embed``, ``embeddings``, ``show``: check, reserve, relay."""
    raw = await read_request_body(ex, scope, receive)
    body = parse_object(raw)
    route = ex.route
    await ex.check_model(_model_of(route, body))
    settings = ex.ctx.settings
    window = KeepAliveWindow(settings.keep_alive_min_seconds, settings.keep_alive_max_seconds)
    try:
        apply_native_caps(body, ex.identity.caps, window)
    except CapRefusal as exc:
        raise Refusal(400, "invalid_request", exc.message, param=exc.param) from None
    estimate = estimate_native_prompt(route, body)
    if route == "show":
        tokens = 0
    elif route in _NO_OUTPUT:
        tokens = estimate
    else:
        plan = plan_output(
            native_num_predict(body),
            ex.ctx.settings.default_max_tokens,
            estimate,
            token_room(ex.identity.allowance),
        )
        if plan.forward_cap:
            _set_num_predict(body, plan.output)
        tokens = estimate + plan.output
    await ex.reserve(estimate, tokens)
    if ex.identity.log_prompts:
        ex.prompt_text = raw.decode("utf-8", "replace")
    upstream = await forward(ex, path, _encoder.encode(body))
    if upstream.status != 200:
        raise await upstream_refusal(ex, upstream)
    content_type = upstream.content_type
    if content_type.startswith(_NDJSON):
        await relay_ndjson(ex, upstream, receive, send)
        return
    data = await read_whole(ex, upstream, receive)
    counts = decode_final_counts(data) if route != "show" else None
    if counts is not None and counts.prompt_eval_count is not None:
        ex.charge(counts.prompt_eval_count, counts.eval_count or 0)
    elif route != "show":
        ex.charge_estimate(0)  # e.g. /api/embeddings, which reports no count
    if ex.identity.log_prompts:
        ex.response_text = data.decode("utf-8", "replace")
    await ex.settle()
    await ex.respond(send, 200, data, content_type.encode("latin-1"))


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
