"""One try of a request on one upstream: the I/O driver around the relay.

An attempt opens the upstream's answer, waits for its first body byte
(``gateway.first_byte_timeout``: a peer whose backend is wedged is given
up on, and the next peer tried, since nothing reached the client yet), then
commits: the head goes to the client and every chunk after it passes
through a :class:`~meshollama.gateway.resume.StreamRelay` (the sans-IO state
machine that decides what the client sees and how a broken stream may go
on elsewhere). Between two chunks the upstream has
``gateway.stall_timeout`` seconds; a silent one counts as broken, like a
reset or a killed peer.

An attempt ends in one of three ways, and says which:

* ``None``: the client has a complete answer, or an explicit error, sent;
* :class:`Failure`: it failed before its first byte; nothing of it reached
  the client, so the caller may try another peer;
* :class:`Broken`: it committed and then broke; the caller asks the relay
  whether and how the answer goes on (``proxy_resume``).

Exceptions are mapped here, once, into those outcomes; only
:class:`~meshollama.gateway.asgi.ClientGone` and cancellation pass through.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import trio

from .. import routing
from ..errors import UpstreamBusy, UpstreamUnavailable
from ..httpmsg import Headers, ProxyRequest, ProxyResponse, Upstream, content_length, error_text, forwardable, header
from ..tracing import CLIENT, NO_SPAN, TRACE_ID_HEADER, with_context
from .asgi import ClientGone, Responder
from .endpoints import Endpoint
from .errors import Answer, error_answer
from .metrics import GatewayMetrics
from .resume import StreamRelay

log = logging.getLogger("meshollama.gateway.proxy")

PEER_HEADER = "x-meshollama-peer"
# Answers worth trying another peer for, if nothing reached the client yet.
RETRY_STATUSES = frozenset({500, 502, 503, 504})
# Of those, the ones that say something about the peer. Ollama also answers
# 500 for request-specific mistakes (a bad ``format`` or ``options`` type,
# spec §1.7, §1.9): sidelining on 500 would let one bad client sideline
# every healthy peer.
SIDELINE_STATUSES = frozenset({502, 503, 504})
ERROR_BODY_LIMIT = 64 * 1024  # an upstream error answer kept for relaying
ERROR_BODY_TIMEOUT = 10.0  # seconds to read it
# A line (NDJSON) or event (SSE) the relay holds back until it is whole: past
# this, the upstream is broken (a final object with a long ``context`` fits).
MAX_HELD = 16 * 1024 * 1024
# Response headers Hypercorn writes itself, and ours.
_DROP_RESPONSE = frozenset({"date", "server", PEER_HEADER, TRACE_ID_HEADER})


def response_headers(headers: Headers) -> Headers:
    return tuple((k, v) for k, v in forwardable(headers) if k not in _DROP_RESPONSE)


def streamed(content_type: str) -> bool:
    ctype = content_type.lower()
    return "ndjson" in ctype or "event-stream" in ctype


def declared_length(status: int, headers: Headers) -> Headers:
    """The upstream's Content-Length, relayed with a non-streamed body passed on
    unchanged: the answer is then framed as Ollama framed it and goes out in
    one write, where chunked framing costs the client more parsing and an
    extra write. A body cut short still fails loudly (the connection closes
    before the declared length). Streamed bodies (NDJSON, SSE) stay chunked,
    so a wrong length from a peer can never cut a stream and an error line
    can still end it (or a resumed answer be longer than the first peer's)."""
    if status < 200 or status in (204, 304) or streamed(header(headers, "content-type") or ""):
        return ()
    return content_length(headers)


@dataclass
class Outcome:
    """What one request did, for metrics and logs."""

    started: float
    model: str = ""
    peer: str = ""
    content_type: str = ""
    client_gone: bool = False
    body_unread: bool = False  # an answer now must close the connection
    error: str = ""  # what an error answer said, for the log
    envelope: str = "ollama"
    ttfb: float | None = None  # seconds from the request to the first byte relayed (None: no answer relayed)
    span: Any = NO_SPAN  # tracing: the request's ``gateway`` span
    route: Any = None  # tracing: its ``route`` span, parent of each try's ``peer stream`` span (None: not routed)


@dataclass
class _Try:
    """One attempt on one peer, for the router's stats."""

    started: float
    routed: bool = False  # feeds the router's stats
    model_key: str = ""
    warm: bool = False  # the snapshot said the model was loaded there: a first byte measures speed, not a load
    ttfb: float | None = None
    ok: bool = False
    pieces: int = 0  # body lines relayed (streamed tokens, for NDJSON and SSE)
    span: Any = NO_SPAN  # tracing: this try's ``peer stream`` span

    def relayed(self, chunk: bytes) -> None:
        self.pieces += max(1, chunk.count(b"\n"))


@dataclass(frozen=True)
class Failure:
    """An upstream attempt that failed before any byte of it reached the client."""

    kind: str  # unavailable | busy | timeout | http_<status> | broken | error
    message: str
    answer: Answer | None = None  # the upstream's own answer, relayed if nobody does better
    sideline: bool = True
    retry: bool = True  # False: trying elsewhere would only repeat it (a whole answer too slow to come)


@dataclass(frozen=True)
class Broken:
    """A committed attempt that broke mid-answer (reset, killed, stalled, truncated)."""

    reason: str
    spent: float  # seconds the upstream worked on it


class Attempts:
    """Runs attempts for one gateway (its stats, metrics and timeouts)."""

    def __init__(self, mesh: Any, stats: routing.RouteStats, metrics: GatewayMetrics, *, first_byte_timeout: float,
                 stall_timeout: float, sideline_seconds: float, on_finished=None) -> None:
        self.mesh = mesh
        self.stats = stats
        self.metrics = metrics
        self.first_byte_timeout = first_byte_timeout
        self.stall_timeout = stall_timeout
        self.sideline_seconds = sideline_seconds
        self._on_finished = on_finished or (lambda: None)

    async def run(self, endpoint: Endpoint, peer: str, upstream: Upstream | None, request: ProxyRequest,
                  responder: Responder, out: Outcome, relay: StreamRelay, *, retry_5xx: bool,
                  model_key: str = "", warm: bool = False, streaming: bool = True,
                  timeouts: bool = True) -> Failure | Broken | None:
        """One try on one peer (see the module docstring). ``relay.state`` says
        whether this is the first upstream of the answer ("waiting") or a
        continuation ("resuming"). ``streaming``: the client asked for a
        streamed answer; a non-streamed one sends its first byte when the
        whole answer is done, so the first-byte timeout then bounds the whole
        generation, and a peer past it is not tried again elsewhere (that
        would only repeat the work): the client gets a 504. ``timeouts``:
        False for model management on this node's backend (a pull, a blob
        upload: long and silent by nature). Raises :class:`ClientGone`."""
        first_byte_timeout = self.first_byte_timeout if timeouts else math.inf
        track = upstream is None  # routed tries feed the router's stats; local management does not
        attempt = _Try(started=trio.current_time(), routed=track, model_key=model_key, warm=warm)
        # The try's span: its context, not the client's, is the parent the next hop sees.
        local = upstream is not None or peer == getattr(self.mesh, "self_id", None)
        attempt.span = (out.route or out.span).child("peer stream", CLIENT,
                                                     {"meshollama.peer": peer, "meshollama.local": local})
        request = with_context(request, attempt.span.context)
        if track:
            self.stats.started(peer, attempt.started)
        result: Failure | Broken | None = None
        try:
            if upstream is None:
                upstream = self.mesh.upstream(peer)
            with trio.CancelScope(deadline=attempt.started + first_byte_timeout) as first_byte:
                async with upstream.open(request) as resp:
                    attempt.span.set("http.response.status_code", resp.status)
                    if resp.status in RETRY_STATUSES and (retry_5xx or relay.state == "resuming"):
                        answer = await _read_error_answer(resp, endpoint)
                        result = Failure(f"http_{resp.status}", f"answered {resp.status}", answer,
                                         resp.status in SIDELINE_STATUSES)
                        return result
                    if relay.state == "resuming" and resp.status != 200:
                        result = Failure(f"http_{resp.status}", f"answered {resp.status} to the continuation",
                                         await _read_error_answer(resp, endpoint), sideline=False)
                        return result
                    chunks = resp.body.__aiter__()
                    try:
                        try:
                            first = await _first_chunk(chunks)
                        except Exception as exc:
                            result = Failure("broken", f"failed before the first byte: {exc}")
                            return result
                        first_byte.deadline = math.inf  # committed: the stall timeout takes over
                        result = await self._relay(endpoint, peer, resp, first, chunks, responder, out, attempt,
                                                   relay, self.stall_timeout if timeouts else math.inf)
                    finally:
                        # Close the body iterator here, before the upstream context
                        # exits, rather than whenever the garbage collector gets to it.
                        await _aclose(chunks)
            if first_byte.cancelled_caught:
                self.metrics.timeouts.labels("first_byte").inc()
                if streaming:
                    result = Failure("timeout", f"no answer within {first_byte_timeout:g}s (gateway.first_byte_timeout)")
                else:
                    message = (f"no whole answer from {peer} within {first_byte_timeout:g}s (gateway.first_byte_timeout "
                               "bounds a non-streamed answer: stream it, or raise the limit)")
                    result = Failure("timeout", message, error_answer(504, message, envelope=endpoint.envelope),
                                     sideline=False, retry=False)
        except ClientGone:
            out.client_gone = True
            attempt.ok = True  # not the peer's fault
            raise
        except UpstreamBusy as exc:
            result = Failure("busy", str(exc) or "busy")
        except UpstreamUnavailable as exc:
            result = Failure("unavailable", str(exc) or "unavailable")
        except Exception as exc:
            if attempt.ttfb is not None:
                # The upstream's context failed while closing, after we committed.
                if result is None and not responder.ending:
                    result = Broken(f"{type(exc).__name__}: {exc}", trio.current_time() - attempt.started)
                else:
                    log.debug("%s: upstream %s failed on close: %r", endpoint.label, peer, exc)
            else:
                log.warning("%s: upstream %s raised %r before answering", endpoint.label, peer, exc)
                result = Failure("error", f"{type(exc).__name__}: {exc}")
        finally:
            self._finished(peer, attempt, result)
            _end_span(attempt.span, result, "client_gone" if out.client_gone else "ok" if attempt.ok else "cancelled")
        return result

    def _finished(self, peer: str, attempt: _Try, result: Failure | Broken | None) -> None:
        now = trio.current_time()
        if attempt.routed:
            self.stats.finished(peer, now, ok=attempt.ok, latency=now - attempt.started, ttfb=attempt.ttfb,
                                model=attempt.model_key, chunks=attempt.pieces,
                                count_ttfb=False)  # taken at the first byte
            if isinstance(result, Failure) and result.sideline or isinstance(result, Broken):
                self.stats.sideline(peer, now, self.sideline_seconds)
        if isinstance(result, Failure):
            self.metrics.upstream_errors.labels(_kind_label(result.kind)).inc()
        elif isinstance(result, Broken):
            self.metrics.stream_errors.inc()
            self.metrics.upstream_errors.labels("broken").inc()
        self._on_finished()

    async def _relay(self, endpoint: Endpoint, peer: str, resp: ProxyResponse, first: bytes | None, chunks: Any,
                     responder: Responder, out: Outcome, attempt: _Try, relay: StreamRelay,
                     stall_timeout: float) -> Failure | Broken | None:
        """Relay a committed answer through ``relay``, chunk by chunk."""
        now = trio.current_time()
        attempt.ttfb = now - attempt.started
        if attempt.routed:  # inference only: not pulls, creates or uploads on this node
            self.metrics.peer_ttfb.labels(peer, out.model).observe(attempt.ttfb)
        attempt.span.event("first byte")
        ctype = header(resp.headers, "content-type", "") or ""
        continuing = relay.state == "resuming"
        if continuing:
            try:
                relay.resumed(peer, ctype)
            except ValueError as exc:  # not the stream the continuation asked for
                return Failure("broken", str(exc), sideline=False)
        else:
            out.peer = peer
            out.content_type = ctype
            if resp.status == 200:
                relay.commit(peer, ctype)
            # The router learns the peer's speed at once, from streamed answers on a
            # warm model only: a non-streamed first byte is the whole generation,
            # and a cold one is a model load (COLD_PENALTY already counts those).
            if attempt.routed and attempt.warm and streamed(ctype):
                self.stats.first_byte(peer, now, attempt.ttfb, model=attempt.model_key)
            if out.ttfb is None:
                out.ttfb = now - out.started
            self.metrics.ttfb.labels(endpoint.label).observe(now - out.started)
            closing = (("connection", "close"),) if out.body_unread else ()  # an upload the backend did not read
            headers = response_headers(resp.headers) + declared_length(resp.status, resp.headers)
            await responder.start(resp.status, headers + ((PEER_HEADER, peer),) + closing)
            if resp.status >= 400 and first is not None:
                out.error = error_text(first)
        passing = relay.state == "waiting"  # not committed (an error status): raw pass-through
        chunk = first
        progress = trio.current_time()  # when the client last got bytes: a trickle without a whole line is a stall
        while chunk is not None:
            attempt.relayed(chunk)
            data = chunk if passing else relay.feed(chunk)
            if data:
                progress = trio.current_time()
                await responder.body(data)
            elif not passing and relay.held > MAX_HELD:
                return Broken(f"a line of over {MAX_HELD} bytes", trio.current_time() - attempt.started)
            broken = None
            with trio.move_on_at(progress + stall_timeout) as stall:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    chunk = None
                except ClientGone:
                    raise
                except Exception as exc:
                    broken = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if stall.cancelled_caught:
                self.metrics.timeouts.labels("stall").inc()
                broken = f"nothing to relay for {stall_timeout:g}s (gateway.stall_timeout)"
            if broken is not None:
                if not passing and relay.state in ("done", "failed"):
                    break  # the answer is whole (or ended by the backend's own error): only its close failed
                return Broken(broken, trio.current_time() - attempt.started)
        if passing:
            await responder.end()
            attempt.ok = True
            return None
        complete, tail = relay.end()
        if not complete:
            return Broken("the answer ended without its final object", trio.current_time() - attempt.started)
        await responder.end(tail)
        attempt.ok = True
        return None


def _end_span(span: Any, result: Failure | Broken | None, otherwise: str) -> None:
    if not span.recording:
        return
    if isinstance(result, Failure):
        span.set("meshollama.outcome", result.kind)
        span.end(result.message)
    elif isinstance(result, Broken):
        span.set("meshollama.outcome", "broken")
        span.end(result.reason)
    else:
        span.set("meshollama.outcome", otherwise)
        span.end()


def _kind_label(kind: str) -> str:
    return "http_5xx" if kind.startswith("http_") else kind


async def _aclose(chunks: Any) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as exc:  # a body that fails to close has nothing left to give us
            log.debug("closing an upstream body failed: %r", exc)


async def _first_chunk(chunks: Any) -> bytes | None:
    """The first non-empty chunk, or None if the body is empty."""
    async for chunk in chunks:
        if chunk:
            return chunk
    return None


async def _read_error_answer(resp: ProxyResponse, endpoint: Endpoint) -> Answer:
    """The upstream's (small) error answer, byte for byte; a stand-in if it
    is too big, too slow or broken."""
    parts: list[bytes] = []
    size = 0
    complete = False
    try:
        with trio.move_on_after(ERROR_BODY_TIMEOUT):
            async for chunk in resp.body:
                size += len(chunk)
                if size > ERROR_BODY_LIMIT:
                    break
                parts.append(chunk)
            else:
                complete = True
    except Exception:
        complete = False
    if complete:
        return Answer(resp.status, response_headers(resp.headers), b"".join(parts))
    return error_answer(resp.status, f"upstream answered {resp.status}", envelope=endpoint.envelope)
