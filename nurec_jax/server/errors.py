"""Request errors and their gRPC status codes: one mapping, used by every RPC (protocol.md section 8).

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


class Unimplemented(RequestError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Cancelled(RequestError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(Cancelled):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is a device (or host) allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for an exception raised while serving a request."""
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
