"""Request errors and their gRPC status codes: one mapping, used by every RPC (docs/wire.md#error-model).

Library code raises plain exceptions (`ValueError` for a malformed field, `KeyError` never: use the
classes below); the servicer maps them in `status_of`. Messages always name the offending field or id.
"""

from __future__ import annotations

import grpc

from nurec_jax.errors import SceneFormatError


class RequestError(Exception):
    """An error with a fixed gRPC status code."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(RequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class OutOfRange(RequestError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(RequestError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RequestError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(RequestError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(RequestError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AlreadyExists(RequestError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Cancelled(RequestError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(Cancelled):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


# Longest id (scene, camera, track, asset, rig) a request may carry; longer ones are refused before any lookup.
MAX_ID_CHARS = 256
# Longest user string echoed into a message or log line, and longest status message sent back.
QUOTE_CHARS = 64
MAX_MESSAGE_CHARS = 4096


def quoted(value, limit: int = QUOTE_CHARS) -> str:
    """A user-supplied string for a message or log line: its repr when short, else the repr of its
    first `limit` characters with an ellipsis and the full length, e.g. `'abc…' (60000000 chars)`.
    Messages never grow with the request, so a huge id cannot inflate a status or the log."""
    if not isinstance(value, (str, bytes, bytearray)):
        value = str(value)
    if len(value) <= limit:
        return repr(value)
    unit = "chars" if isinstance(value, str) else "bytes"
    head = value[:limit] if isinstance(value, str) else bytes(value[:limit]).decode("utf-8", "replace")
    return f"{repr(head + '…')} ({len(value)} {unit})"


def check_id(value: str, field: str, max_chars: int = MAX_ID_CHARS) -> str:
    """Raises InvalidArgument naming `field` when an id is longer than `max_chars`; returns it."""
    if len(value) > max_chars:
        raise InvalidArgument(f"{field}: {quoted(value)} is longer than {max_chars} characters")
    return value


def _bounded(message: str) -> str:
    """Caps a status message (a last guard: messages are built with `quoted`, so this rarely cuts)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}… ({len(message)} chars)"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is a device (or host) allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for an exception raised while serving a request (message length bounded)."""
    code, message = _status_of(exc)
    return code, _bounded(message)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    if isinstance(exc, SceneFormatError):
        return grpc.StatusCode.FAILED_PRECONDITION, f"scene cannot be loaded: {exc}"
    if is_out_of_memory(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


def batch_error_message(exc: BaseException) -> str:
    """NRE's per-item error text: "<STATUS_NAME>: <message>"."""
    code, msg = status_of(exc)
    return f"{code.name}: {msg}"
