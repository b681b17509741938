"""One error tree for the whole project.

Every error the project raises on purpose derives from :class:`WifiBridgeError`. A subclass
says how it surfaces: ``http_status`` for the webhook's answer and ``code`` for the JSON error
body and the metric label; ``retryable`` tells a caller whether trying again can help.
"""

from __future__ import annotations


class WifiBridgeError(Exception):
    """Root of every error raised by the project."""

    http_status: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ConfigError(WifiBridgeError, ValueError):
    """A setting has a value the process cannot run with; the message names the setting."""

    code = "config_error"


class RequestError(WifiBridgeError):
    """The request cannot be accepted as it is; the sender gets a 4xx answer."""

    http_status = 400
    code = "bad_request"


class BadBody(RequestError):
    """The (decompressed) body is not a JSON object; it is kept in the dead-letter topic."""

    code = "bad_body"


class BadEncoding(RequestError):
    """The body's Content-Encoding is broken (a truncated or corrupt gzip stream)."""

    code = "bad_encoding"


class UnsupportedEncoding(RequestError):
    http_status = 415
    code = "unsupported_encoding"


class BodyTooLarge(RequestError):
    http_status = 413
    code = "body_too_large"


class BodyTimeout(RequestError):
    """The body did not arrive within the read timeout (a stalled or trickling client)."""

    http_status = 408
    code = "body_timeout"


class ClientDisconnected(RequestError):
    """The client closed the connection before its body arrived; nobody is left to answer."""

    code = "client_disconnected"


class Unauthorized(RequestError):
    http_status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    http_status = 403
    code = "forbidden"


class RecordRefused(RequestError):
    """Kafka refuses this one record for good (its content): neither a retry nor the spool can
    get it in, and it says nothing about Kafka's health."""

    http_status = 422
    code = "record_refused"


class RecordTooLarge(RecordRefused):
    """The record (body, key and headers) is larger than Kafka takes."""

    http_status = 413
    code = "record_too_large"


class PublishError(WifiBridgeError):
    """Kafka did not acknowledge a record in time; the sender may try again later."""

    http_status = 503
    code = "kafka_unavailable"
    retryable = True


class BatchRefused(PublishError):
    """The broker refused the batch a record travelled in, for its size or its content.

    The record may be the cause, or only have shared the batch with it: published alone it
    tells, and ``refusal`` is what it is refused with then if it is the cause.
    """

    code = "batch_refused"

    def __init__(self, message: str, *, refusal: RecordRefused) -> None:
        super().__init__(message)
        self.refusal = refusal
