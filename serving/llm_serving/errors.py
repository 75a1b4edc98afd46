"""Domain errors and the one table that maps each to an HTTP status and a TGI `error_type`."""

from __future__ import annotations

from typing import ClassVar


class ServingError(Exception):
    """Base of every error a client can see; subclasses fix the status and the error type."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "generation"
    prefix: ClassVar[str] = ""
    plain: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def text(self) -> str:
        """The message as TGI writes it, with its prefix."""
        return f"{self.prefix}{self.message}"

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}

    def body(self) -> dict[str, object]:
        """The TGI `ErrorResponse` body."""
        return {"error": self.text, "error_type": self.error_type}

    def openai_stream_body(self) -> dict[str, object]:
        """The error event TGI sends inside an OpenAI-style stream."""
        return {"error": {"message": self.text, "http_status_code": self.status}}


class ValidationError(ServingError):
    """A request that breaks one of TGI's validation rules."""

    status = 422
    error_type = "validation"
    prefix = "Input validation error: "


class ToolError(ServingError):
    """A request's tools or tool choice cannot be used (TGI's `ToolError`)."""

    status = 422
    error_type = "tool_error"
    prefix = "Tool error: "


class ModelNotFoundError(ServingError):
    """An OpenAI `model` that is neither the base model nor a loaded LoRA adapter: 404 in OpenAI's shape."""

    status = 404
    error_type = "model_not_found"

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.text,
                "type": "invalid_request_error",
                "param": "model",
                "code": self.error_type,
            }
        }


class SuffixError(ServingError):
    """`/v1/completions` with a `suffix`, refused before any answer starts (TGI's own error type)."""

    status = 422
    error_type = "suffix not supported"

    def __init__(
        self, message: str = "Suffix is not supported and can be achieved by preprocessing the prompt."
    ) -> None:
        super().__init__(message)


class BatchSizeError(ServingError):
    """`/v1/completions` with more prompts than `max_client_batch_size` (TGI's own error type)."""

    status = 422
    error_type = "batch size exceeded"


class OverloadedError(ServingError):
    """The concurrency limit is reached; the client should retry later."""

    status = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class GenerationError(ServingError):
    """The model failed while generating."""

    status = 424
    error_type = "generation"
    prefix = "Request failed during generation: "


class IncompleteGenerationError(ServingError):
    """Generation ended without a final token: the drain period after SIGTERM ran out before it finished."""

    status = 500
    error_type = "incomplete_generation"


class NoFastTokenizerError(ServingError):
    """`/tokenize` needs character offsets, which only fast (Rust) tokenizers give; TGI answers the same."""

    status = 404
    error_type = "no fast tokenizer"

    def __init__(self, message: str = "No fast tokenizer or tokenizer.json for this model") -> None:
        super().__init__(message)


class TemplateError(ServingError):
    """The chat template could not be rendered."""

    status = 422
    error_type = "template_error"


class UnhealthyError(ServingError):
    """The model is not loaded yet, or the server is draining."""

    status = 503
    error_type = "healthcheck"


class HealthCheckError(UnhealthyError):
    """`/health` while the model loads, the server drains or the engine has failed (TGI's body)."""

    def __init__(self, message: str = "unhealthy") -> None:
        super().__init__(message)


class DrainingError(UnhealthyError):
    """The server is draining after SIGTERM: 503, and the client should not reuse the connection."""

    def __init__(self, message: str = "Server is shutting down") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}


class EngineDeadError(UnhealthyError):
    """The engine thread failed; the server stays unhealthy until it is restarted."""

    prefix = "Request failed during generation: the engine stopped: "


class UnauthorizedError(ServingError):
    """No bearer token, or the wrong one."""

    status = 401
    error_type = "unauthorized"

    def __init__(self, message: str = "Missing or invalid bearer token") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class BadJsonError(ServingError):
    """The body is not JSON (axum answers in plain text)."""

    status = 400
    error_type = "bad_request"
    prefix = "Failed to parse the request body as JSON: "
    plain = True


class BodyTypeError(ServingError):
    """The JSON does not fit the route's type."""

    status = 422
    error_type = "unprocessable"
    prefix = "Failed to deserialize the JSON body into the target type: "
    plain = True


class MediaTypeError(ServingError):
    status = 415
    error_type = "unsupported_media_type"
    plain = True

    def __init__(self, message: str = "Expected request with `Content-Type: application/json`") -> None:
        super().__init__(message)


class BodyTooLargeError(ServingError):
    status = 413
    error_type = "payload_too_large"
    plain = True

    def __init__(self, message: str = "Failed to buffer the request body: length limit exceeded") -> None:
        super().__init__(message)
