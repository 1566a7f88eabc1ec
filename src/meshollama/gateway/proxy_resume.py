"""The proxy's resume flow: an answer that broke mid-stream continues on another
holder of the same model digest (``resume.StreamRelay`` decides what to send),
or ends with an explicit error (:func:`end_broken`). :class:`ResumeMixin` is
part of ``proxy.Proxy``; it is here to keep that module to its main path."""

from __future__ import annotations

import logging
from typing import Any

import trio

from .. import routing
from ..httpmsg import ProxyRequest
from .asgi import Responder
from .attempt import Attempts, Broken, Failure, Outcome
from .endpoints import Endpoint
from .errors import ndjson_error_line, sse_error_event
from .metrics import GatewayMetrics
from .resume import Continuation, GiveUp, StreamRelay

log = logging.getLogger("meshollama.gateway.proxy")  # one logger for the proxy, as attempt.py


class ResumeMixin:
    """Needs ``Proxy``'s ``attempts``, ``metrics``, ``mesh``, ``stats``, ``rng``,
    ``strategy``, ``retries`` and ``_rr``."""

    attempts: Attempts
    metrics: GatewayMetrics

    async def _resume(self, endpoint: Endpoint, request: ProxyRequest, responder: Responder, out: Outcome,
                      relay: StreamRelay, key: str, peer: str, digest: str, broken: Broken,
                      found: dict[str, Any]) -> None:
        """The answer broke mid-stream on ``peer``: continue it on another holder
        of the same model ``digest``, as often as it breaks and peers remain, or
        end it with an explicit error."""
        tried = {peer}
        while True:
            log.warning("%s %s: stream from %s broke after %d bytes: %s", endpoint.label, out.model, peer,
                        responder.bytes_sent, broken.reason)
            if relay.state == "waiting":  # never committed (an error answer, a pass-through): nothing to resume
                await end_broken(responder, out, f"upstream {peer} failed mid-stream: {broken.reason}")
                return
            decision = relay.broke(broken.reason, broken.spent)
            out.route.event("broken", peer=peer, reason=broken.reason, resumed=isinstance(decision, Continuation))
            if not isinstance(decision, Continuation):
                await self._end(responder, out, decision, broken.reason)
                return
            next_request = ProxyRequest("POST", decision.path, request.headers, decision.body)
            result: Failure | Broken | None = Failure("none", "no other peer serves this model digest")
            tried_any = False
            for candidate in self._resume_order(key, digest, tried, found):
                tried.add(candidate)
                tried_any = True
                result = await self.attempts.run(endpoint, candidate, None, next_request, responder, out, relay,
                                                 retry_5xx=True, model_key=key)
                if not isinstance(result, Failure):
                    break
                log.warning("%s %s: continuation on %s failed (%s): %s", endpoint.label, out.model, candidate,
                            result.kind, result.message)
            if result is None:
                self.metrics.resumes.labels("resumed").inc()
                return
            if isinstance(result, Broken):
                self.metrics.resumes.labels("resumed").inc()
                peer, broken = relay.peers[-1], result
                continue
            self.metrics.resumes.labels("failed" if tried_any else "no_peer").inc()  # others tried and failed, or none
            out.error = f"stream broke on {peer} ({broken.reason}) and no peer could continue it: {result.message}"
            await responder.end(relay.give_up(out.error))
            return

    async def _end(self, responder: Responder, out: Outcome, decision: Any, reason: str) -> None:
        """End a stream the relay will not continue: its tail (an explicit error,
        or the final object when the answer was already as long as asked)."""
        if isinstance(decision, GiveUp):
            self.metrics.resumes.labels("refused").inc()
            out.error = decision.message
            if not decision.tail:  # a pass-through body: end it the generic way
                await end_broken(responder, out, decision.message)
                return
        await responder.end(decision.tail)

    def _resume_order(self, key: str, digest: str, tried: set[str], found: dict[str, Any]) -> list[str]:
        """Peers to continue on: alive holders of ``key`` with the same digest
        (the same weights give the same continuation), best first; then holders found
        through the DHT that said they hold that digest."""
        snapshot = self.mesh.snapshot()
        now = trio.current_time()
        order = routing.choose(snapshot, key, self.stats, now, self.rng, self.strategy, frozenset(tried),
                               next(self._rr), only=lambda p: (m := p.model(key)) is not None and m.digest == digest)
        order += [pid for pid, f in found.items() if pid not in tried and pid not in order and digest
                  and f.digest == digest]
        return order[: 1 + self.retries]


async def end_broken(responder: Responder, out: Outcome, message: str) -> None:
    """End a started response so the client sees an error, not a clean end.

    NDJSON gets Ollama's own convention, one ``{"error": ...}`` line; SSE
    an error event the OpenAI SDKs raise on. Any other body is left
    unterminated: Hypercorn then closes the connection without the final
    chunk, and the client reports an incomplete body instead of parsing a
    truncated one as if it were whole.
    """
    out.error = out.error or message
    ctype = out.content_type.lower()
    if "ndjson" in ctype:
        sep = b"" if responder.tail.endswith(b"\n") or not responder.tail else b"\n"
        await responder.end(sep + ndjson_error_line(message))
    elif "text/event-stream" in ctype:
        sep = b"" if responder.tail.endswith(b"\n\n") or not responder.tail else b"\n\n"
        await responder.end(sep + sse_error_event(message, out.envelope))
