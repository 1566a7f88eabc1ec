"""OTLP/HTTP export with JSON encoding, on httpx (no OpenTelemetry package needed).

:func:`encode` is the pure part: spans to an ``ExportTraceServiceRequest``
in OTLP's JSON mapping (``resourceSpans`` > ``scopeSpans`` > ``spans``; ids
as hex, times as Unix nanoseconds in decimal strings, kinds and status codes
as numbers, attributes as ``{"key", "value": {"stringValue": ...}}``).

:class:`OtlpExporter` is the I/O: ``export(span)`` only appends to a
bounded queue (a full queue drops the span and counts it: a slow or absent
collector never slows a request), and :meth:`OtlpExporter.serve`, a
background task, POSTs batches to ``{endpoint}/v1/traces`` every
``interval`` seconds or as soon as a batch is full. When it is cancelled or
closed, a POST in progress is abandoned at once and what is left (that
batch included) is sent, shielded, for at most ``flush_timeout``; spans that
could not be sent by then are counted as failed. A batch that fails for any
reason (the collector, the network, a header httpx cannot encode) is counted
as failed and the exporter goes on: it never takes the app down with it.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from .. import __version__
from .spans import Attributes, Span

log = logging.getLogger("meshollama.tracing")

QUEUE_SIZE = 4096  # spans waiting for export; past it new ones are dropped
BATCH_SIZE = 512  # spans per POST
EXPORT_INTERVAL = 2.0  # seconds between POSTs when no batch fills up
EXPORT_TIMEOUT = 10.0  # seconds one POST may take
FLUSH_TIMEOUT = 3.0  # seconds the final flush may take on shutdown


def traces_url(endpoint: str) -> str:
    """``http://collector:4318`` -> ``http://collector:4318/v1/traces`` (a full URL is kept).

    The path is joined onto the URL's path, before any query (the config refuses one).
    """
    parts = urlsplit(endpoint.strip())
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    return urlunsplit(parts._replace(path=path, fragment=""))


def shown_url(url: str) -> str:
    """``url`` for a log line: a ``user:password@`` in it reads ``***@``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def encode(spans: Iterable[Span], resource: Attributes) -> dict[str, Any]:
    """An OTLP JSON ``ExportTraceServiceRequest`` for ``spans`` of one resource."""
    return {
        "resourceSpans": [{
            "resource": {"attributes": _attributes(resource)},
            "scopeSpans": [{
                "scope": {"name": "meshollama", "version": __version__},
                "spans": [_span(s) for s in spans],
            }],
        }],
    }


def _span(s: Span) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": s.context.trace_id,
        "spanId": s.context.span_id,
        "name": s.name,
        "kind": s.kind,
        "startTimeUnixNano": str(s.start_ns),
        "endTimeUnixNano": str(s.end_ns),
        "attributes": _attributes(s.attributes),
        "status": {"code": s.status, **({"message": s.message} if s.message else {})},
    }
    if s.parent_id:
        out["parentSpanId"] = s.parent_id
    if s.context.state:
        out["traceState"] = s.context.state
    if s.events:
        out["events"] = [{"timeUnixNano": str(t), "name": name, "attributes": _attributes(attrs)}
                         for t, name, attrs in s.events]
    return out


def _attributes(attrs: Attributes) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in attrs.items()]


def _value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}  # int64 is a string in proto3's JSON mapping
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    return {"stringValue": str(v)}


class OtlpExporter:
    """Batches finished spans to an OTLP/HTTP collector (JSON)."""

    def __init__(self, endpoint: str, *, resource: Attributes, headers: Iterable[tuple[str, str]] = (),
                 queue_size: int = QUEUE_SIZE, batch_size: int = BATCH_SIZE, interval: float = EXPORT_INTERVAL,
                 timeout: float = EXPORT_TIMEOUT, flush_timeout: float = FLUSH_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None,
                 on_count: Callable[[str, int], None] | None = None) -> None:
        self.url = traces_url(endpoint)
        self.shown_url = shown_url(self.url)
        self.resource = dict(resource)
        self.headers = [("content-type", "application/json"), *headers]
        self.queue_size, self.batch_size = queue_size, batch_size
        self.interval, self.timeout, self.flush_timeout = interval, timeout, flush_timeout
        self.counts = {"exported": 0, "dropped": 0, "failed": 0}
        self._on_count = on_count or (lambda outcome, n: None)
        self._transport = transport
        self._queue: deque[Span] = deque()
        self._wake = trio.Event()
        self._stop = trio.CancelScope()  # around the export loop; close() cancels it
        self._sending: list[Span] = []  # the batch being POSTed (resent by the flush if cut off)
        self._running = False
        self._done = trio.Event()
        self._failing = False  # log a failing collector once, not per batch

    def export(self, span: Span) -> None:
        """Queue ``span``; never blocks (a full queue drops it)."""
        if len(self._queue) >= self.queue_size:
            self._count("dropped", 1)
            return
        self._queue.append(span)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export until cancelled or :meth:`close` d; then flush, time-boxed."""
        self._running = True
        try:
            async with httpx.AsyncClient(timeout=self.timeout, transport=self._transport) as client:
                task_status.started()
                try:
                    with self._stop:
                        while True:
                            with trio.move_on_after(self.interval):
                                await self._wake.wait()
                            self._wake = trio.Event()
                            await self._send_queued(client)
                finally:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + self.flush_timeout
                        await self._send_queued(client)
        finally:
            # What the flush could not send in time (or a client that would not even open).
            lost = len(self._sending) + len(self._queue)
            self._sending = []
            self._queue.clear()
            if lost:
                self._count("failed", lost)
                log.warning("tracing: %d spans not exported to %s before shutdown", lost, self.shown_url)
            self._running = False
            self._done.set()

    async def close(self) -> None:
        """Stop :meth:`serve` (a POST in progress is cut off), let it flush, and wait (bounded)."""
        self._stop.cancel()
        if self._running:
            with trio.move_on_after(self.flush_timeout + 1.0):
                await self._done.wait()

    async def _send_queued(self, client: httpx.AsyncClient) -> None:
        if self._sending:  # cut off by close() or a cancellation: its spans were never counted
            await self._post(client, self._sending)
        while self._queue:
            self._sending = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            await self._post(client, self._sending)

    async def _post(self, client: httpx.AsyncClient, batch: list[Span]) -> None:
        """POST ``batch`` and count it; any failure but a cancellation counts it as failed."""
        problem = ""
        try:
            body = json.dumps(encode(batch, self.resource), separators=(",", ":")).encode()
            response = await client.post(self.url, content=body, headers=self.headers)
            if response.status_code >= 300:
                problem = f"HTTP {response.status_code}: {response.text[:200]!r}"
        except Exception as exc:  # noqa: BLE001 - httpx, the network, a header or span it cannot encode
            problem = f"{type(exc).__name__}: {exc}"
        self._sending = []
        if problem:
            self._count("failed", len(batch))
            if not self._failing:
                log.warning("tracing: cannot export spans to %s (%s); dropping them until it answers",
                            self.shown_url, problem)
            self._failing = True
            return
        if self._failing:
            log.info("tracing: exporting spans to %s again", self.shown_url)
        self._failing = False
        self._count("exported", len(batch))

    def _count(self, outcome: str, n: int) -> None:
        self.counts[outcome] += n
        self._on_count(outcome, n)
