"""Distributed tracing: W3C trace context across the mesh, spans, OTLP export.

One request's spans, on the node whose gateway took it and on the peer that
served it, share one trace id (docs/tracing.md)::

    gateway (server)                    node A: the whole HTTP request
      route                             the routing decision, retries and resumes as events
        peer stream (client)            one per try on a peer (or this node's backend)
          serve (server)                node B: the request that came over the mesh
            backend (client)            B's call to Ollama, whose traceparent names this span

Modules:

* ``context``: ``traceparent``/``tracestate`` parsing and formatting (sans-IO, strict);
* ``spans``: :class:`Tracer`, spans, :class:`InMemoryExporter` (for tests);
* ``otlp``: OTLP/HTTP JSON encoding and the batching :class:`OtlpExporter`;
* ``hops``: context in and out of requests, the response's trace id header,
  :class:`ServedBackend` (the serving node's spans);
* ``wiring``: the tracer from the ``tracing`` config section.
"""

from .context import SpanContext, extract, format_traceparent, inject, parse_traceparent, parse_tracestate
from .hops import TRACE_ID_HEADER, ServedBackend, end_request, ending, from_scope, send_trace_id, with_context
from .otlp import OtlpExporter, encode
from .spans import CLIENT, INTERNAL, NO_SPAN, OFF, SERVER, InMemoryExporter, NonRecordingSpan, Span, Tracer
from .wiring import for_app, tracer_from_config

__all__ = [
    "CLIENT", "INTERNAL", "NO_SPAN", "OFF", "SERVER", "TRACE_ID_HEADER", "InMemoryExporter", "NonRecordingSpan",
    "OtlpExporter", "ServedBackend", "Span", "SpanContext", "Tracer", "encode", "end_request", "ending", "extract",
    "for_app",
    "format_traceparent", "from_scope", "inject", "parse_traceparent", "parse_tracestate", "send_trace_id",
    "tracer_from_config", "with_context",
]
