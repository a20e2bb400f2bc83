"""What the proxy refuses, as one exception the request pipeline renders in the dialect."""

from __future__ import annotations

__all__ = ["ClientLeft", "Refusal", "model_unavailable", "upstream_unavailable"]


class Refusal(Exception):
    """An answer other than the upstream's: status, error code, message, maybe Retry-After."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        body: bytes | None = None,
        limit: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.body = body  # a body already in the dialect (e.g. a translated upstream error)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.limit = limit  # the limit that refused (429s), named in the native body
        self.should_retry = should_retry  # sent as x-should-retry when set


class ClientLeft(Exception):
    """The client went away before its request was complete: nothing to answer."""


def model_unavailable(model: str, surface: str = "native") -> Refusal:
    """The one answer for a model that is not allowed *or* not installed (indistinguishable).

    Native: 403. OpenAI's ``/v1`` and Anthropic's ``/v1/messages``: 404
    (``model_not_found`` / ``not_found_error``), which their SDKs raise as
    ``NotFoundError`` (a 403 would read as a permission problem).
    """
    if surface in ("openai", "anthropic"):
        return Refusal(
            404,
            "model_not_found",
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )
    return Refusal(
        403,
        "forbidden",
        f"model '{model}' is not available to this key",
        param="model",
    )


def upstream_unavailable(detail: str = "the model server is unavailable") -> Refusal:
    """Ollama could not be reached (connection refused, reset, timeout)."""
    return Refusal(502, "upstream_unavailable", detail, retry_after=1)
