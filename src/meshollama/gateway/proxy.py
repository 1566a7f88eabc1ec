"""The routed-request engine: pick a peer, retry before the first byte, relay.

Why raw ASGI and not a Quart view: Quart asks a view for the status and
headers first and iterates the body later, outside the view. An upstream's
answer is an ``async with upstream.open(...)`` context (a libp2p stream, an
httpx response) that must stay open from the status to the last chunk; in
Quart it would have to be entered in the view and left inside a body
generator, i.e. a context held across ``return`` and ``yield``. That breaks
in three ways (read in the Quart 0.22 / Quart-Trio 0.12 sources):

* trio cancel scopes or nurseries inside the upstream would be exited in a
  different frame than they were entered (``yield`` inside a cancel scope);
* if the client disconnects after the view returned but before Quart starts
  the body, Quart never enters the body iterator, so it is never closed and
  the upstream keeps generating for nobody;
* Quart-Trio sends every response under ``RESPONSE_TIMEOUT`` (60 s by default)
  and silently cuts longer streams.

Here one function holds the request from the first to the last byte, the
upstream context is entered and left lexically, and a sibling task watches
for ``http.disconnect`` and cancels the whole request, which closes the
upstream context and so aborts the remote work. Each chunk is handed to
Hypercorn as its own ``http.response.body`` message, which Hypercorn writes
to the socket at once: nothing is buffered or re-chunked.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any

import trio

from .. import names, routing
from ..errors import (
    ModelNotFound,
    NoCapacity,
    RequestError,
    UpstreamBusy,
    UpstreamError,
    UpstreamUnavailable,
)
from ..httpmsg import (
    Headers,
    ProxyRequest,
    ProxyResponse,
    Upstream,
    content_length,
    error_text,
    forwardable,
    header,
)
from .asgi import (
    ASGIApp,
    BodyStream,
    ClientGone,
    Receive,
    Responder,
    Scope,
    Send,
    body_expected,
    read_body,
    scope_header,
    scope_headers,
    send_answer,
)
from .endpoints import Endpoint, check_fields, match, model_of, parse_payload
from .errors import (
    METHOD_NOT_ALLOWED_PAGE,
    Answer,
    answer_for,
    error_answer,
    message_of,
    ndjson_error_line,
    sse_error_event,
)
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

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
# Request headers that describe the client's hop, not the request.
_DROP_REQUEST = frozenset({"origin", "referer", "cookie", "expect", PEER_HEADER})
# Response headers Hypercorn writes itself, and ours.
_DROP_RESPONSE = frozenset({"date", "server", PEER_HEADER})


# --- pure helpers -----------------------------------------------------------


def request_target(scope: Scope) -> str:
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    target = path.decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return target


def request_headers(scope: Scope) -> Headers:
    """What travels to the upstream: end-to-end headers minus the client's hop."""
    return tuple((k, v) for k, v in forwardable(scope_headers(scope)) if k not in _DROP_REQUEST)


def response_headers(headers: Headers) -> Headers:
    return tuple((k, v) for k, v in forwardable(headers) if k not in _DROP_RESPONSE)


def _streamed(content_type: str) -> bool:
    ctype = content_type.lower()
    return "ndjson" in ctype or "event-stream" in ctype


def declared_length(status: int, headers: Headers) -> Headers:
    """The upstream's Content-Length, relayed with a non-streamed body passed on
    unchanged: the answer is then framed as Ollama framed it and goes out in
    one write, where chunked framing costs the client more parsing and an
    extra write. A body cut short still fails loudly (the connection closes
    before the declared length). Streamed bodies (NDJSON, SSE) stay chunked,
    so a wrong length from a peer can never cut a stream and an error line
    can still end it."""
    if status < 200 or status in (204, 304) or _streamed(header(headers, "content-type") or ""):
        return ()
    return content_length(headers)


# --- bookkeeping ------------------------------------------------------------


@dataclass
class _Outcome:
    """What one request did, for metrics and logs."""

    started: float
    model: str = ""
    peer: str = ""
    content_type: str = ""
    client_gone: bool = False
    body_unread: bool = False  # an answer now must close the connection
    error: str = ""  # what an error answer said, for the log
    envelope: str = "ollama"  # how a broken stream ends (see _end_broken)


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

    def relayed(self, chunk: bytes) -> None:
        self.pieces += max(1, chunk.count(b"\n"))


@dataclass(frozen=True)
class _Failure:
    """An upstream attempt that failed before any byte reached the client."""

    kind: str  # unavailable | busy | http_<status> | broken | error
    message: str
    answer: Answer | None = None  # the upstream's own answer, relayed if nobody does better
    sideline: bool = True


# --- the engine -------------------------------------------------------------


class Proxy:
    """Serves the proxied endpoints for one gateway."""

    def __init__(
        self,
        gateway_config: Any,
        mesh: Any,
        backend: Upstream | None,
        metrics: GatewayMetrics,
        *,
        stats: routing.RouteStats | None = None,
        rng: random.Random | None = None,
    ) -> None:
        g = gateway_config
        self.mesh = mesh
        self.backend = backend
        self.metrics = metrics
        self.stats = stats if stats is not None else routing.RouteStats()
        self.rng = rng if rng is not None else random.Random()
        self.strategy = routing.Strategy(getattr(g.routing, "value", g.routing))
        self.retries = max(0, int(g.retries))
        self.sideline_seconds = float(g.sideline_seconds)
        self.max_body = int(g.max_body_bytes)
        self.max_concurrent = int(g.max_concurrent) if g.max_concurrent else 0
        self.in_flight = 0
        self._rr = itertools.count()
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no proxied request is in flight (all answered and counted)."""
        while self.in_flight:
            await self._idle.wait()

    async def serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request completely; never raises except on cancellation."""
        out = _Outcome(started=trio.current_time(), envelope=endpoint.envelope)
        responder = Responder(send)
        if self.max_concurrent and self.in_flight >= self.max_concurrent:
            message = f"gateway busy: {self.in_flight} requests in flight (gateway.max_concurrent)"
            answer = error_answer(503, message, envelope=endpoint.envelope)
            await send_answer(send, answer, close=body_expected(scope))
            self._count(endpoint, out, 503)
            return
        self.in_flight += 1
        self.metrics.in_flight.inc()
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                await self._serve(endpoint, scope, receive, responder, out, nursery)
                nursery.cancel_scope.cancel()  # stop the disconnect watcher
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            status = 499 if out.client_gone else (responder.status or 500)
            self._count(endpoint, out, status)
            if status >= 400 and status != 499:
                # Every error answer is logged with what it said (4xx at info: the client's mistake).
                log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s %s -> %d%s: %s",
                        scope.get("method", ""), endpoint.label, out.model or "-", status,
                        f" from {out.peer}" if out.peer else "", out.error or "(no message)")
            if not self.in_flight:
                self._idle.set()

    def _count(self, endpoint: Endpoint, out: _Outcome, status: int) -> None:
        self.metrics.requests.labels(endpoint.label, out.model, out.peer, str(status)).inc()
        self.metrics.duration.labels(endpoint.label).observe(trio.current_time() - out.started)

    async def _serve(
        self,
        endpoint: Endpoint,
        scope: Scope,
        receive: Receive,
        responder: Responder,
        out: _Outcome,
        nursery: trio.Nursery,
    ) -> None:
        out.body_unread = body_expected(scope)
        try:
            if endpoint.stream_body and out.body_unread:
                request = self._streamed_request(scope, receive, responder, out, nursery)
            else:
                body = await read_body(scope, receive, self.max_body)
                out.body_unread = False
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope, responder, out)
                request = ProxyRequest(scope["method"], request_target(scope), request_headers(scope), body)
            if endpoint.routed:
                await self._routed(endpoint, request, responder, out)
            else:
                await self._local(endpoint, request, responder, out)
        except ClientGone:
            out.client_gone = True
        except Exception as exc:
            if not isinstance(exc, (RequestError, UpstreamError)):
                log.exception("%s: unexpected error", endpoint.label)
            await self._fail(endpoint, responder, out, exc)

    def _streamed_request(
        self, scope: Scope, receive: Receive, responder: Responder, out: _Outcome, nursery: trio.Nursery
    ) -> ProxyRequest:
        """A request whose body goes to the backend as it arrives (blob uploads):
        no size limit and no copy in memory; the backend (Ollama) checks the
        digest. The disconnect watcher starts once the body is read."""

        def body_read() -> None:
            out.body_unread = False
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope, responder, out)

        declared = scope_header(scope, "content-length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        return ProxyRequest(
            scope["method"],
            request_target(scope),
            request_headers(scope),
            stream=BodyStream(receive, body_read),
            stream_length=length,
        )

    async def _fail(self, endpoint: Endpoint, responder: Responder, out: _Outcome, exc: Exception) -> None:
        """Make sure the client gets an explicit error, however far we got."""
        out.error = message_of(exc)
        try:
            if not responder.started:
                await responder.answer(answer_for(exc, envelope=endpoint.envelope), close=out.body_unread)
            elif not responder.finished:
                await self._end_broken(responder, out, f"gateway error: {type(exc).__name__}")
        except ClientGone:
            out.client_gone = True

    @staticmethod
    async def _watch_disconnect(
        receive: Receive, scope: trio.CancelScope, responder: Responder, out: _Outcome
    ) -> None:
        """Cancel the request when the client goes away (Hypercorn sends ``http.disconnect``)."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server's receive channel is gone: nothing to watch
            return
        # Hypercorn also reports the end of a completed exchange as a disconnect.
        if not responder.ending:
            out.client_gone = True
            scope.cancel()

    async def _routed(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: _Outcome) -> None:
        payload = parse_payload(request.body, endpoint)
        model = model_of(payload, endpoint)
        key = names.key(model)
        snapshot = self.mesh.snapshot()
        now = trio.current_time()
        self.stats.observe(snapshot)
        order = routing.choose(
            snapshot, key, self.stats, now, self.rng, self.strategy, frozenset(), next(self._rr)
        )
        if not order:
            # It exists, on peers we have no path to now: a 503, not a 404
            # (which tells clients to pull it).
            held = [f"{p.peer_id} ({p.state.value})" for p in snapshot.peers if p.serves(key)
                    and p.state.value in ("down", "unreachable")]
            if held:
                raise NoCapacity(f"model '{model}' is only on peers this node cannot reach now: {', '.join(held)}; "
                                 "see `meshollama peers`")
            raise ModelNotFound(endpoint.not_found_message(model))
        out.model = names.shortest(model)
        check_fields(payload, endpoint)  # after the 404, as Ollama checks them after loading
        tries = order[: 1 + self.retries]
        last: tuple[str, Answer] | None = None
        for n, peer in enumerate(tries, 1):
            failure = await self._attempt(endpoint, peer, None, request, responder, out, retry_5xx=True,
                                          model_key=key, warm=self._warm(snapshot, peer, key, now))
            if failure is None:
                return
            log.warning("%s %s: peer %s failed (%s): %s", endpoint.label, out.model, peer, failure.kind, failure.message)
            if failure.answer is not None:
                last = (peer, failure.answer)
            if n < len(tries):
                self.metrics.retries.labels(failure.kind).inc()
        if last is not None:
            # Every try failed and the last word was an upstream's own answer:
            # the client gets it unchanged (a 503 "server busy" stays a 503).
            peer, answer = last
            out.peer = peer
            out.error = error_text(answer.body)
            await responder.answer(answer.with_headers((PEER_HEADER, peer)))
            return
        raise NoCapacity(f"all peers serving '{model}' are busy or failing (tried {len(tries)})")

    def _warm(self, snapshot: Any, peer_id: str, model_key: str, now: float) -> bool:
        """The model is loaded on the peer: its heartbeat says so, or it answered
        for this model a moment ago (the heartbeat may not have caught up)."""
        view = snapshot.get(peer_id)
        model = view.model(model_key) if view is not None else None
        return bool(model is not None and model.loaded) or self.stats.recently_answered(peer_id, model_key, now)

    async def _local(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: _Outcome) -> None:
        if self.backend is None:
            raise UpstreamUnavailable("this node has no local backend")
        peer = self.mesh.self_id
        failure = await self._attempt(endpoint, peer, self.backend, request, responder, out, retry_5xx=False)
        if failure is not None:
            raise (UpstreamBusy if failure.kind == "busy" else UpstreamUnavailable)(failure.message)

    async def _attempt(
        self,
        endpoint: Endpoint,
        peer: str,
        upstream: Upstream | None,
        request: ProxyRequest,
        responder: Responder,
        out: _Outcome,
        *,
        retry_5xx: bool,
        model_key: str = "",
        warm: bool = False,
    ) -> _Failure | None:
        """One try on one peer. None: the client got a complete answer (or an
        explicit mid-stream error). A :class:`_Failure`: nothing was sent, the
        caller may try elsewhere. Raises :class:`ClientGone`."""
        track = upstream is None  # routed tries feed the router's stats; local management does not
        attempt = _Try(started=trio.current_time(), routed=track, model_key=model_key, warm=warm)
        if track:
            self.stats.started(peer, attempt.started)
        failure: _Failure | None = None
        try:
            if upstream is None:
                upstream = self.mesh.upstream(peer)
            async with upstream.open(request) as resp:
                if retry_5xx and resp.status in RETRY_STATUSES:
                    answer = await self._read_error_answer(resp, endpoint)
                    sideline = resp.status in SIDELINE_STATUSES
                    failure = _Failure(f"http_{resp.status}", f"answered {resp.status}", answer, sideline)
                    return failure
                chunks = resp.body.__aiter__()
                try:
                    failure = await self._relay(endpoint, peer, resp, chunks, responder, out, attempt)
                finally:
                    # Close the body iterator here, before the upstream context
                    # exits, rather than whenever the garbage collector gets to it.
                    await _aclose(chunks)
        except ClientGone:
            out.client_gone = True
            attempt.ok = True  # not the peer's fault
            raise
        except UpstreamBusy as exc:
            failure = _Failure("busy", str(exc) or "busy")
        except UpstreamUnavailable as exc:
            failure = _Failure("unavailable", str(exc) or "unavailable")
        except Exception as exc:
            if responder.started:
                # The upstream's context failed while closing, after we committed.
                if not responder.ending:
                    await self._stream_broken(endpoint, responder, out, peer, exc)
                else:
                    log.debug("%s: upstream %s failed on close: %r", endpoint.label, peer, exc)
                return None
            log.warning("%s: upstream %s raised %r before answering", endpoint.label, peer, exc)
            failure = _Failure("error", f"{type(exc).__name__}: {exc}")
        finally:
            now = trio.current_time()
            if track:
                self.stats.finished(
                    peer,
                    now,
                    ok=attempt.ok,
                    latency=now - attempt.started,
                    ttfb=attempt.ttfb,
                    model=attempt.model_key,
                    chunks=attempt.pieces,
                    count_ttfb=False,  # taken at the first byte
                )
                if failure is not None and failure.sideline:
                    self.stats.sideline(peer, now, self.sideline_seconds)
            if failure is not None:
                self.metrics.upstream_errors.labels(_kind_label(failure.kind)).inc()
        return failure

    async def _relay(
        self,
        endpoint: Endpoint,
        peer: str,
        resp: ProxyResponse,
        chunks: Any,
        responder: Responder,
        out: _Outcome,
        attempt: _Try,
    ) -> _Failure | None:
        """Relay an upstream answer. The head is held back until the first body
        byte: an upstream that fails in between is still retryable."""
        try:
            first = await _first_chunk(chunks)
        except Exception as exc:
            return _Failure("broken", f"failed before the first byte: {exc}")
        # Commit: from here on the answer is this peer's.
        attempt.ttfb = trio.current_time() - attempt.started
        out.peer = peer
        out.content_type = header(resp.headers, "content-type", "") or ""
        # The router learns the peer's speed at once, from streamed answers on a
        # warm model only: a non-streamed first byte is the whole generation,
        # and a cold one is a model load (COLD_PENALTY already counts those).
        if attempt.routed and attempt.warm and _streamed(out.content_type):
            self.stats.first_byte(peer, trio.current_time(), attempt.ttfb, model=attempt.model_key)
        self.metrics.ttfb.labels(endpoint.label).observe(trio.current_time() - out.started)
        closing = (("connection", "close"),) if out.body_unread else ()  # an upload the backend did not read
        headers = response_headers(resp.headers) + declared_length(resp.status, resp.headers)
        await responder.start(resp.status, headers + ((PEER_HEADER, peer),) + closing)
        if first is not None:
            if resp.status >= 400:
                out.error = error_text(first)
            attempt.relayed(first)
            await responder.body(first)
            try:
                async for chunk in chunks:
                    attempt.relayed(chunk)
                    await responder.body(chunk)
            except ClientGone:
                raise
            except Exception as exc:
                await self._stream_broken(endpoint, responder, out, peer, exc)
                return None
        await responder.end()
        attempt.ok = True
        return None

    async def _stream_broken(
        self, endpoint: Endpoint, responder: Responder, out: _Outcome, peer: str, exc: BaseException
    ) -> None:
        self.metrics.stream_errors.inc()
        self.metrics.upstream_errors.labels("broken").inc()
        log.warning("%s %s: stream from %s broke after %d bytes: %r", endpoint.label, out.model, peer,
                    responder.bytes_sent, exc)
        await self._end_broken(responder, out, f"upstream {peer} failed mid-stream: {exc or type(exc).__name__}")

    @staticmethod
    async def _end_broken(responder: Responder, out: _Outcome, message: str) -> None:
        """End a started response so the client sees an error, not a clean end.

        NDJSON gets Ollama's own convention, one ``{"error": ...}`` line; SSE
        an error event the OpenAI SDKs raise on. Any other body is left
        unterminated: Hypercorn then closes the connection without the final
        chunk, and the client reports an incomplete body instead of parsing a
        truncated one as if it were whole.
        """
        ctype = out.content_type.lower()
        if "ndjson" in ctype:
            sep = b"" if responder.tail.endswith(b"\n") or not responder.tail else b"\n"
            await responder.end(sep + ndjson_error_line(message))
        elif "text/event-stream" in ctype:
            sep = b"" if responder.tail.endswith(b"\n\n") or not responder.tail else b"\n\n"
            await responder.end(sep + sse_error_event(message, out.envelope))

    @staticmethod
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


class ProxyRoutes:
    """ASGI app serving the proxied endpoints; everything else goes to ``fallback`` (Quart)."""

    def __init__(self, proxy: Proxy, fallback: ASGIApp) -> None:
        self.proxy = proxy
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = match(scope["path"])
            if endpoint is not None:
                if scope["method"] not in endpoint.methods:
                    allow = ", ".join(sorted(endpoint.methods))
                    answer = METHOD_NOT_ALLOWED_PAGE.with_headers(("allow", allow))
                    await send_answer(send, answer, close=body_expected(scope))
                    return
                await self.proxy.serve(endpoint, scope, receive, send)
                return
        await self.fallback(scope, receive, send)
