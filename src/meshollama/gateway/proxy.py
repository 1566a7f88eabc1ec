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

What happens to a routed request, in order (the pieces live in their own
modules): it waits its turn in the model's queue when every holder is busy
(``queueing``); it is tried on up to ``1 + retries`` peers until one sends a
first byte within ``first_byte_timeout`` (``attempt``); its answer passes
through a sans-IO relay (``resume.StreamRelay``), and when the serving peer
dies, freezes or stalls mid-stream the relay says how the answer continues
on another holder of the same model digest, which ``proxy_resume`` then
finds and opens, or how it ends with an explicit error. ``proxy_routes``
hands the proxied endpoints to :class:`Proxy` and the rest to Quart.
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Any

import trio

from .. import names, routing
from ..errors import NoCapacity, RequestError, UpstreamBusy, UpstreamError, UpstreamUnavailable
from ..httpmsg import Headers, ProxyRequest, Upstream, error_text, forwardable
from ..tracing import OFF, SERVER, end_request, ending, from_scope, send_trace_id
from .asgi import (
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
from .asking import Asking
from .attempt import PEER_HEADER, Attempts, Broken, Failure, Outcome
from .endpoints import Endpoint, check_fields, model_of, parse_payload
from .errors import answer_for, error_answer, message_of
from .metrics import GatewayMetrics
from .proxy_resume import ResumeMixin, end_broken
from .queueing import ModelQueues
from .resume import StreamRelay

log = logging.getLogger(__name__)

# Request headers that describe the client's hop, not the request. The client's
# trace context goes on as the parent of each try's span (``attempt``), re-formatted.
_DROP_REQUEST = frozenset({"origin", "referer", "cookie", "expect", PEER_HEADER, "traceparent", "tracestate"})


def request_target(scope: Scope) -> str:
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    target = path.decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return target


def request_headers(scope: Scope) -> Headers:
    """What travels to the upstream: end-to-end headers minus the client's hop."""
    return tuple((k, v) for k, v in forwardable(scope_headers(scope)) if k not in _DROP_REQUEST)


class Proxy(ResumeMixin):
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
        self.max_body = int(g.max_body_bytes)
        self.max_concurrent = int(g.max_concurrent) if g.max_concurrent else 0
        self.resume = bool(g.resume)
        self.queues = ModelQueues(
            g.queue_size, g.queue_timeout,
            on_depth=lambda key, depth: metrics.queue_depth.labels(names.shortest(key)).set(depth),
            on_outcome=lambda outcome: metrics.queue_outcomes.labels(outcome).inc(),
        )
        self.attempts = Attempts(mesh, self.stats, metrics, first_byte_timeout=float(g.first_byte_timeout),
                                 stall_timeout=float(g.stall_timeout), sideline_seconds=float(g.sideline_seconds),
                                 on_finished=self.queues.poke)
        self.in_flight = 0
        # gateway.traffic.Traffic (the panel's charts and last requests), set by the app; None: not kept.
        self.traffic: Any = None
        self.tracer: Any = OFF  # tracing.Tracer, set by the app: spans, and the trace context each try carries
        self.draining = False  # the node drains for a restart: new requests go to another node
        self.models: Any = None  # models.service.ModelService: /api/pull from peers first
        self._rr = itertools.count()
        self.asking = Asking(self)
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no proxied request is in flight (all answered and counted)."""
        while self.in_flight:
            await self._idle.wait()

    async def serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request completely; never raises except on cancellation."""
        span = self.tracer.start("gateway", from_scope(scope), SERVER, {
            "http.request.method": scope.get("method", ""), "url.path": scope.get("path", ""),
            "meshollama.endpoint": endpoint.label})
        send = send_trace_id(send, span.context)  # X-Meshollama-Trace-Id on every answer of a proxied, traced request
        out = Outcome(started=trio.current_time(), envelope=endpoint.envelope, span=span)
        responder = Responder(send)
        refusal = ""
        if self.draining:
            refusal = "this node is draining for a restart: send the request to another node"
        elif self.max_concurrent and self.in_flight >= self.max_concurrent:
            refusal = f"gateway busy: {self.in_flight} requests in flight (gateway.max_concurrent)"
        if refusal:
            answer = error_answer(503, refusal, envelope=endpoint.envelope).with_headers(("retry-after", "1"))
            await send_answer(send, answer, close=body_expected(scope) or self.draining)
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

    def _count(self, endpoint: Endpoint, out: Outcome, status: int) -> None:
        duration = trio.current_time() - out.started
        self.metrics.requests.labels(endpoint.label, out.model, out.peer, str(status)).inc()
        self.metrics.duration.labels(endpoint.label).observe(duration)
        if self.traffic is not None:
            self.traffic.record(endpoint=endpoint.label, model=out.model, peer=out.peer, status=status,
                                ttfb=out.ttfb, duration=duration)
        end_request(out.span, status, model=out.model, peer=out.peer, error=out.error)

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, responder: Responder, out: Outcome,
                     nursery: trio.Nursery) -> None:
        out.body_unread = body_expected(scope)
        try:
            if endpoint.stream_body and out.body_unread:
                request = self._streamed_request(scope, receive, out, nursery)
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

    def _streamed_request(self, scope: Scope, receive: Receive, out: Outcome, nursery: trio.Nursery) -> ProxyRequest:
        """A request whose body goes to the backend as it arrives (blob uploads):
        no size limit and no copy in memory; the backend (Ollama) checks the
        digest. The disconnect watcher starts once the body is read."""

        def body_read() -> None:
            out.body_unread = False
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope, None, out)

        declared = scope_header(scope, "content-length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        return ProxyRequest(scope["method"], request_target(scope), request_headers(scope),
                            stream=BodyStream(receive, body_read), stream_length=length)

    async def _fail(self, endpoint: Endpoint, responder: Responder, out: Outcome, exc: Exception) -> None:
        """Make sure the client gets an explicit error, however far we got."""
        out.error = message_of(exc)
        try:
            if not responder.started:
                await responder.answer(answer_for(exc, envelope=endpoint.envelope), close=out.body_unread)
            elif not responder.finished:
                await end_broken(responder, out, f"gateway error: {type(exc).__name__}")
        except ClientGone:
            out.client_gone = True

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: trio.CancelScope, responder: Responder | None,
                                out: Outcome) -> None:
        """Cancel the request when the client goes away (Hypercorn sends
        ``http.disconnect``). A failing ``receive`` means the same: the
        server has nothing more to tell about this client, so the request's
        remote work must stop rather than run on for nobody."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:
            log.debug("receive failed while watching for a disconnect: %r", exc)
        # Hypercorn also reports the end of a completed exchange as a disconnect.
        if responder is None or not responder.delivered:
            out.client_gone = True
            scope.cancel()

    # --- routed requests ---------------------------------------------------------

    async def _routed(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: Outcome) -> None:
        out.route = out.span.child("route")  # the decision: tries are its children, retries its events
        with ending(out.route):
            await self._route(endpoint, request, responder, out)

    async def _route(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: Outcome) -> None:
        payload = parse_payload(request.body, endpoint)
        model = model_of(payload, endpoint)
        key = names.key(model)
        found: dict[str, Any] = {}  # peer -> mesh.holders.Found: holders no announcement lists
        if not routing.candidates(self.mesh.snapshot(), key):
            found = await self.asking.holders(endpoint, model, key)
        # One spelling per model in metrics and traffic: the routing key's, not the client's
        # (llama3, Llama3 and LLAMA3:latest route alike; each would be new series).
        out.model = names.shortest(key)
        out.route.set("meshollama.model", out.model)
        check_fields(payload, endpoint)  # after the 404, as Ollama checks them after loading
        path = request.path.split("?", 1)[0]
        relay = StreamRelay(path, payload, resume=self.resume, body=request.body)
        streaming = _streaming(path, payload)
        deadline = trio.current_time() + self.queues.timeout
        after_busy = False
        while True:
            queued = trio.current_time()
            if found:  # holders no announcement lists: their own answers say when a slot is free
                if self.queues.size and (after_busy or all(f.busy() >= 1 for f in found.values())):
                    found = await self.asking.found_free(endpoint, model, key, deadline)
            else:
                await self.queues.wait(key, lambda: self.asking.free(key), label=out.model, after_busy=after_busy,
                                       deadline=deadline,
                                       servable=lambda: bool(routing.candidates(self.mesh.snapshot(), key)))
            if (waited := trio.current_time() - queued) > 0.001:  # it waited in line (a free slot returns at once)
                out.route.event("queued", seconds=round(waited, 3))
            failures = await self._try_in_order(endpoint, request, responder, out, relay, model, key, streaming,
                                                found)
            if failures is None:  # answered, or ended with an explicit error
                return
            if self.queues.size and all(f.kind == "busy" for _, f in failures):
                after_busy = True  # every holder said busy: back in line until a slot frees
                continue
            answered = [(peer, f.answer) for peer, f in failures if f.answer is not None]
            if answered:
                # Every try failed and the last word was an upstream's own answer:
                # the client gets it unchanged (a 503 "server busy" stays a 503).
                peer, answer = answered[-1]
                out.peer = peer
                out.error = error_text(answer.body)
                await responder.answer(answer.with_headers((PEER_HEADER, peer)))
                return
            raise NoCapacity(f"all peers serving '{model}' are busy or failing (tried {len(failures)})")

    async def _try_in_order(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: Outcome,
                            relay: StreamRelay, model: str, key: str, streaming: bool,
                            found: dict[str, Any]) -> list[tuple[str, Failure]] | None:
        """Try up to ``1 + retries`` peers in the router's order until one answers
        (None: the client has its answer or an explicit error, a broken stream
        resumed or ended); else what each tried peer failed with, before its first byte."""
        snapshot = self.mesh.snapshot()
        self.stats.observe(snapshot)
        asked = await self.asking.loads(snapshot, key)
        now = trio.current_time()
        order = routing.choose(snapshot, key, self.stats, now, self.rng, self.strategy, frozenset(), next(self._rr),
                               prefer=asked) or list(found)  # found: least busy first
        if not order:  # every holder went away while we waited
            self.asking.unservable(endpoint, model, key)
        tries = order[: 1 + self.retries]
        if out.route.recording:
            out.route.event("order", candidates=list(order), tries=list(tries))
        failures: list[tuple[str, Failure]] = []
        for n, peer in enumerate(tries, 1):
            # The weights the answer starts on: a continuation must use the same ones,
            # known from now even if the peer has left the table when the stream breaks.
            digest = _digest(snapshot, peer, key) or (found[peer].digest if peer in found else None)
            warm = self._warm(snapshot, peer, key, now) or (peer in found and found[peer].loaded)
            result = await self.attempts.run(endpoint, peer, None, request, responder, out, relay, retry_5xx=True,
                                             model_key=key, warm=warm, streaming=streaming)
            if result is None:
                return None
            if isinstance(result, Broken):
                await self._resume(endpoint, request, responder, out, relay, key, peer, digest, result, found)
                return None
            log.warning("%s %s: peer %s failed (%s): %s", endpoint.label, out.model, peer, result.kind, result.message)
            out.route.event("attempt failed", peer=peer, kind=result.kind, message=result.message)
            failures.append((peer, result))
            if not result.retry:
                break
            if n < len(tries):
                self.metrics.retries.labels(result.kind).inc()
        return failures

    def _warm(self, snapshot: Any, peer_id: str, model_key: str, now: float) -> bool:
        """The model is loaded on the peer: its heartbeat says so, or it answered
        for this model a moment ago (the heartbeat may not have caught up)."""
        view = snapshot.get(peer_id)
        model = view.model(model_key) if view is not None else None
        return bool(model is not None and model.loaded) or self.stats.recently_answered(peer_id, model_key, now)

    # --- local requests ------------------------------------------------------------

    async def _local(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: Outcome) -> None:
        upstream = self.backend
        if endpoint.path == "/api/pull" and self.models is not None:
            upstream = await self.models.pull_upstream(request) or upstream  # a peer has it: no registry download
        if upstream is None:
            raise UpstreamUnavailable("this node has no local backend")
        relay = StreamRelay(request.path.split("?", 1)[0], {}, resume=False)
        result = await self.attempts.run(endpoint, self.mesh.self_id, upstream, request, responder, out, relay,
                                         retry_5xx=False, timeouts=False)
        if isinstance(result, Failure):
            raise (UpstreamBusy if result.kind == "busy" else UpstreamUnavailable)(result.message)
        if isinstance(result, Broken):
            log.warning("%s: local backend broke after %d bytes: %s", endpoint.label, responder.bytes_sent,
                        result.reason)
            await end_broken(responder, out, f"upstream {self.mesh.self_id} failed mid-stream: {result.reason}")


def _digest(snapshot: Any, peer: str, key: str) -> str | None:
    """The digest of ``key`` on ``peer`` in ``snapshot``; None if it is not there."""
    view = snapshot.get(peer)
    model = view.model(key) if view is not None else None
    return model.digest if model is not None else None


def _streaming(path: str, payload: dict) -> bool:
    """Whether the client asked for a streamed answer (Ollama's native
    generation endpoints stream unless told not to; the others do not unless asked)."""
    if path in ("/api/chat", "/api/generate"):
        return payload.get("stream", True) is not False
    if path.startswith("/v1/"):
        return payload.get("stream") is True
    return False
