"""Spans, the tracer that makes them, and the in-memory exporter tests read.

A deliberately small model of OpenTelemetry's: a span has a name, a kind,
a context (:class:`~.context.SpanContext`), its parent's span id,
start and end times in Unix nanoseconds, attributes, events and a status.
Finished spans go to an *exporter* (``export(span)``, synchronous, never
blocking a request): :class:`InMemoryExporter` here, the OTLP one in
:mod:`.otlp`.

Three tracers in one class, by what it is given:

* **off** (no exporter, the default): nothing is recorded, ids are not
  even generated; a span is a :class:`NonRecordingSpan` that carries the
  caller's context unchanged, so a client's ``traceparent`` still reaches
  the next hop (one header copy per request).
* **on, sampled**: :class:`Span` objects, exported when they end.
* **on, not sampled**: new span ids with the sampled flag clear, recorded
  nowhere, so the hops after us know the trace was not sampled.

Sampling is parent-based: a caller's sampled flag decides (the trace is
already recorded upstream, or not); a new trace is sampled when its trace
id falls within ``sample_ratio`` (deterministic in the id, as
OpenTelemetry's ``TraceIdRatioBased``, so every node decides alike).

Ids come from the operating system's CSPRNG (:class:`random.SystemRandom`):
trace ids are returned to clients in ``X-Meshollama-Trace-Id``, and a
Mersenne Twister's state can be rebuilt from a few hundred of its outputs,
which would make other requests' ids predictable.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .context import SAMPLED, SpanContext

# OTLP's SpanKind numbers.
INTERNAL, SERVER, CLIENT = 1, 2, 3
# OTLP's status codes.
UNSET, OK, ERROR = 0, 1, 2

Attributes = dict[str, Any]


class Exporter(Protocol):
    def export(self, span: Span) -> None: ...


class Span:
    """A recorded span; :meth:`end` hands it to the exporter (once)."""

    recording = True
    __slots__ = ("tracer", "name", "kind", "context", "parent_id", "start_ns", "end_ns", "attributes", "events",
                 "status", "message")

    def __init__(self, tracer: Tracer, name: str, kind: int, context: SpanContext, parent_id: str,
                 attributes: Attributes | None) -> None:
        self.tracer = tracer
        self.name = name
        self.kind = kind
        self.context = context
        self.parent_id = parent_id  # "" for a root span
        self.start_ns = tracer.clock()
        self.end_ns = 0
        self.attributes: Attributes = dict(attributes) if attributes else {}
        self.events: list[tuple[int, str, Attributes]] = []
        self.status = UNSET
        self.message = ""

    def set(self, key: str, value: Any) -> None:
        """An attribute: str, bool, int, float or a list of one of those; None is skipped."""
        if value is not None and not self.end_ns:
            self.attributes[key] = value

    def event(self, name: str, **attributes: Any) -> None:
        if not self.end_ns:
            self.events.append((self.tracer.clock(), name, {k: v for k, v in attributes.items() if v is not None}))

    def child(self, name: str, kind: int = INTERNAL, attributes: Attributes | None = None) -> Span | NonRecordingSpan:
        return self.tracer.start(name, self.context, kind, attributes)

    def end(self, error: str | None = None) -> None:
        """Finish the span (later calls do nothing); ``error``: it failed, and why."""
        if self.end_ns:
            return
        if error is not None:
            self.status, self.message = ERROR, error
        self.end_ns = max(self.tracer.clock(), self.start_ns)
        self.tracer.finished(self)

    def __repr__(self) -> str:
        return f"Span({self.name!r}, trace={self.context.trace_id}, id={self.context.span_id}, parent={self.parent_id!r})"


class NonRecordingSpan:
    """A span that records nothing and only carries a context (None: no trace)."""

    recording = False
    __slots__ = ("tracer", "context")

    def __init__(self, tracer: Tracer, context: SpanContext | None) -> None:
        self.tracer = tracer
        self.context = context

    def set(self, key: str, value: Any) -> None:
        pass

    def event(self, name: str, **attributes: Any) -> None:
        pass

    def child(self, name: str, kind: int = INTERNAL, attributes: Attributes | None = None) -> Span | NonRecordingSpan:
        if self.tracer.exporter is None:
            return self  # tracing off: the caller's context goes on unchanged
        return self.tracer.start(name, self.context, kind, attributes)

    def end(self, error: str | None = None) -> None:
        pass


AnySpan = Span | NonRecordingSpan


class Tracer:
    """Makes spans for one node; ``exporter`` None turns recording off.

    ``clock`` gives Unix time in nanoseconds (spans are compared across
    machines, so this is the wall clock, read only here); ``rng`` makes ids
    (the OS's CSPRNG unless a test passes a seeded one).
    """

    def __init__(self, exporter: Exporter | None = None, *, sample_ratio: float = 1.0,
                 clock: Callable[[], int] = time.time_ns, rng: random.Random | None = None) -> None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError("sample_ratio must be between 0 and 1")
        self.exporter = exporter
        self.sample_ratio = sample_ratio
        self._bound = int(sample_ratio * (1 << 64))  # sampled: the trace id's low 64 bits below this
        self.clock = clock
        self._rng = rng if rng is not None else random.SystemRandom()

    @property
    def enabled(self) -> bool:
        return self.exporter is not None

    def start(self, name: str, parent: SpanContext | None, kind: int = INTERNAL,
              attributes: Attributes | None = None) -> AnySpan:
        """A new span under ``parent`` (None: a new trace)."""
        if self.exporter is None:
            return NonRecordingSpan(self, parent)
        if parent is None:
            trace_id = self._id(128)
            sampled = int(trace_id[16:], 16) < self._bound
            state = ""
        else:
            trace_id, sampled, state = parent.trace_id, parent.sampled, parent.state
        context = SpanContext(trace_id, self._id(64), SAMPLED if sampled else 0, state)
        if not sampled:
            return NonRecordingSpan(self, context)
        return Span(self, name, kind, context, parent.span_id if parent is not None else "", attributes)

    def finished(self, span: Span) -> None:
        if self.exporter is not None:
            self.exporter.export(span)

    def _id(self, bits: int) -> str:
        while True:
            value = self._rng.getrandbits(bits)
            if value:
                return f"{value:0{bits // 4}x}"


OFF = Tracer()  # the tracer of code nobody gave one: records nothing, passes contexts on
NO_SPAN = NonRecordingSpan(OFF, None)  # no trace at all: its children are itself


class InMemoryExporter:
    """Keeps finished spans in a list, for tests; ``wait_for`` waits on a condition."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed: trio.Event | None = None

    def export(self, span: Span) -> None:
        self.spans.append(span)
        if self._changed is not None:
            self._changed.set()

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed = trio.Event()
            await self._changed.wait()
