"""The one error tree of meshollama.

Foreign exceptions (libp2p, httpx, llama.cpp, OS errors) are caught at the
edge where they happen and re-raised as one of these, so the rest of the code
only has to know this file. Exactly one place (``gateway/errors.py``) turns
them into HTTP status codes.
"""

from __future__ import annotations


class MeshollamaError(Exception):
    """Base class of every error meshollama raises on purpose."""


# --- start-up -------------------------------------------------------------


class ConfigError(MeshollamaError):
    """A configuration value is missing, unknown, of the wrong type or invalid."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class IdentityError(MeshollamaError):
    """The node's key file cannot be read, written or parsed."""


class PortInUseError(MeshollamaError):
    """A listen address is already taken; the message names the flag to change."""


# --- wire protocols ---------------------------------------------------------


class ProtocolError(MeshollamaError):
    """A peer sent bytes that do not follow one of our wire protocols."""


class FrameError(ProtocolError):
    """A frame on the HTTP-over-libp2p stream is malformed or oversized."""


class AnnouncementError(ProtocolError):
    """A heartbeat announcement is malformed, oversized or unverifiable."""


# --- libp2p ---------------------------------------------------------------


class TrustError(ProtocolError):
    """A certificate or policy that does not verify: forged, foreign, expired, replayed or malformed."""


class P2PError(MeshollamaError):
    """A libp2p operation (dial, stream open, read, write) failed or timed out."""


class StreamReset(P2PError):
    """The remote end reset or closed the stream unexpectedly."""


# --- talking to an upstream (local backend or remote peer) -----------------


class UpstreamError(MeshollamaError):
    """An upstream (local backend or remote peer) failed to serve a request."""

    retryable: bool = False


class UpstreamUnavailable(UpstreamError):
    """Failed before any response byte: dial error, refused, reset. Safe to retry elsewhere."""

    retryable = True


class UpstreamBusy(UpstreamError):
    """The upstream answered that it is at capacity. Safe to retry elsewhere."""

    retryable = True


class UpstreamBroken(UpstreamError):
    """Failed after the response started; the request cannot be retried."""


# --- request-level errors, mapped to HTTP in gateway/errors.py --------------


class RequestError(MeshollamaError):
    """A caller's request cannot be served; carries the HTTP status to answer with."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(RequestError):
    """Malformed body, bad JSON, wrong field type (400)."""

    status = 400


class Unauthorized(RequestError):
    """Missing or wrong API key (401)."""

    status = 401


class ModelNotFound(RequestError):
    """No live peer serves the model (404)."""

    status = 404


class BodyTooLarge(RequestError):
    """Request body over ``gateway.max_body_bytes`` (413)."""

    status = 413


class NoCapacity(RequestError):
    """Peers serve the model but all are busy or failing (503)."""

    status = 503


class Overloaded(NoCapacity):
    """Every holder is busy and the gateway's queue for the model is full or
    timed out (503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))
