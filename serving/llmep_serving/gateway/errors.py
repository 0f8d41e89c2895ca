"""OpenAI's error envelope for every answer the gateway itself produces."""

from __future__ import annotations

import json

JSON_CONTENT_TYPE = "application/json"

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"
INSUFFICIENT_QUOTA = "insufficient_quota"


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def sse_error_event(message: str, code: str, type_: str = SERVER_ERROR) -> bytes:
    """An SSE error event followed by [DONE], as OpenAI and vLLM end a failed stream."""
    return b"data: " + envelope(message, type_, code) + b"\n\ndata: [DONE]\n\n"


class GatewayError(Exception):
    """An error answer: HTTP status plus the fields of the envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str = INVALID_REQUEST,
        param: str | None = None,
        retry_after: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.param = param
        self.retry_after = retry_after
        self.close = close
        self.model = ""  # metrics label, set once the request's model is resolved
        self.headers: dict[str, str] = {}  # sent with the answer: the key's x-ratelimit-* headers

    def body(self) -> bytes:
        return envelope(self.message, self.type, self.code, self.param)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields: pickled whole, so an error raised in the body parser process arrives intact.
        kwargs = {"type_": self.type, "param": self.param, "retry_after": self.retry_after, "close": self.close}
        return _rebuild, (self.status, self.code, self.message, kwargs)


def _rebuild(status: int, code: str, message: str, kwargs: dict[str, object]) -> GatewayError:
    return GatewayError(status, code, message, **kwargs)  # type: ignore[arg-type]


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401,
        "invalid_api_key",
        "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
    )


def model_not_found(model: str) -> GatewayError:
    # Same answer for a model that does not exist and one outside the key's scope.
    return GatewayError(
        404,
        "model_not_found",
        f"The model '{model[:200]}' does not exist or you do not have access to it.",
        param="model",
    )


def request_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "request_too_large",
        f"Request body is larger than the limit of {limit} bytes (max_body_bytes).",
        close=True,
    )


def body_over_budget(size: int, budget: int) -> GatewayError:
    return GatewayError(
        413,
        "request_too_large",
        f"Request body of {size} bytes is larger than the gateway's budget for request bodies "
        f"in flight, {budget} bytes (max_inflight_body_bytes).",
        close=True,
    )


def body_budget_full(budget: int, retry_after: int) -> GatewayError:
    # Not closed: the client gets the answer once its body has been read and dropped.
    return GatewayError(
        429,
        "too_many_request_bytes",
        f"The gateway is holding its limit of request body bytes ({budget} bytes, "
        "max_inflight_body_bytes); retry later.",
        type_=RATE_LIMIT,
        retry_after=retry_after,
    )


def invalid_json(detail: str) -> GatewayError:
    return GatewayError(
        400,
        "invalid_json",
        f"We could not parse the JSON body of your request ({detail}). "
        "The body must be a JSON object.",
    )


def missing_model() -> GatewayError:
    return GatewayError(400, "missing_model", "You must provide a model parameter.", param="model")


def invalid_type(param: str, expected: str) -> GatewayError:
    return GatewayError(
        400, "invalid_type", f"Invalid type for '{param}': expected {expected}.", param=param
    )


def not_found(path: str) -> GatewayError:
    return GatewayError(404, "not_found", f"Unknown request URL: {path[:200]}.")


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405, "method_not_allowed", f"Method {method[:16]} is not allowed on {path[:200]}."
    )


def too_many_requests(limit: int, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"Too many concurrent requests for this API key (limit {limit}).",
        type_=RATE_LIMIT,
        retry_after=retry_after,
    )


def over_rate_limit(per_minute: str, limit: int, retry_after: int) -> GatewayError:
    """Over a key's requests or tokens per minute; ``per_minute`` is OpenAI's error type for it."""
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"Rate limit reached for this API key on {per_minute} per minute: limit {limit}. "
        f"Please try again in {retry_after}s.",
        type_=per_minute,
        retry_after=retry_after,
    )


def daily_quota_used(limit: int, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        INSUFFICIENT_QUOTA,
        f"This API key has used its daily budget of {limit} tokens (tokens_per_day); "
        "it is renewed at 00:00 UTC.",
        type_=INSUFFICIENT_QUOTA,
        retry_after=retry_after,
    )


def queue_full(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "model_queue_full",
        f"The model '{model}' is starting and its wait queue is full.",
        type_=SERVER_ERROR,
        retry_after=retry_after,
    )


def model_busy(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        "model_busy",
        f"The model '{model}' is at capacity and its fair queue is full (fair_queue_size); "
        "retry later.",
        type_=RATE_LIMIT,
        retry_after=retry_after,
    )


def model_queue_timeout(model: str, waited: float, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "model_queue_timeout",
        f"The model '{model}' stayed at capacity for the {waited:g}s this request may wait "
        "(fair_queue_timeout); retry later.",
        type_=SERVER_ERROR,
        retry_after=retry_after,
    )


def model_not_ready(model: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        "model_not_ready",
        f"The model '{model}' has no ready replica yet; retry later.",
        type_=SERVER_ERROR,
        retry_after=retry_after,
    )


def backend_unavailable(model: str) -> GatewayError:
    return GatewayError(
        502,
        "backend_unavailable",
        f"The backend serving '{model}' could not be reached or failed to answer.",
        type_=SERVER_ERROR,
    )


def backend_response_too_large(model: str, limit: int) -> GatewayError:
    return GatewayError(
        502,
        "backend_response_too_large",
        f"The backend serving '{model}' answered with more than {limit} bytes "
        "(max_response_bytes).",
        type_=SERVER_ERROR,
    )


def backend_timeout(model: str) -> GatewayError:
    return GatewayError(
        504,
        "backend_timeout",
        f"The backend serving '{model}' did not answer in time.",
        type_=SERVER_ERROR,
    )


def shutting_down() -> GatewayError:
    return GatewayError(
        503,
        "gateway_shutting_down",
        "The gateway is shutting down and its grace period for this request is over; retry.",
        type_=SERVER_ERROR,
        retry_after=1,
    )


def body_timeout() -> GatewayError:
    return GatewayError(
        408, "request_timeout", "The request body was not received in time.", close=True
    )


def internal_error() -> GatewayError:
    return GatewayError(
        500, "internal_error", "The gateway failed to handle the request.", type_=SERVER_ERROR
    )
