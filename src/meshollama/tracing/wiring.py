"""A node's tracer from its ``tracing`` config section, and the exporter's lifetime.

The exporter runs while the gateway app serves: Quart's ``before_serving``
starts it in the app's own nursery, ``after_serving`` flushes it (bounded)
when Hypercorn shuts the app down, so no extra task is wired into the node.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from .. import __version__
from .otlp import OtlpExporter
from .spans import Tracer

log = logging.getLogger("meshollama.tracing")


def tracer_from_config(tracing: Any, node_id: str, registry: CollectorRegistry | None = None) -> Tracer:
    """An off tracer without ``tracing.otlp_endpoint``; else one exporting there."""
    endpoint = getattr(tracing, "otlp_endpoint", "") if tracing is not None else ""
    if not endpoint:
        return Tracer()
    counter = Counter("meshollama_tracing_spans", "Finished spans, by what became of them (exported, dropped "
                      "because the export queue was full, failed to reach the collector)", ["outcome"],
                      registry=registry)
    resource = {"service.name": tracing.service_name, "service.version": __version__,
                "service.instance.id": node_id}
    headers = [tuple(h.split("=", 1)) for h in tracing.headers]
    exporter = OtlpExporter(endpoint, resource=resource, headers=headers,  # type: ignore[arg-type]
                            on_count=lambda outcome, n: counter.labels(outcome).inc(n))
    log.info("tracing: exporting spans to %s (sampling %g of new traces)", exporter.shown_url,
             tracing.sample_ratio)
    return Tracer(exporter, sample_ratio=tracing.sample_ratio)


def for_app(app: Any, config: Any, mesh: Any, registry: CollectorRegistry | None) -> Tracer:
    """The node's tracer, its exporter started and flushed with ``app`` (a QuartTrio app)."""
    tracer = tracer_from_config(getattr(config, "tracing", None), str(getattr(mesh, "self_id", "")), registry)
    exporter = tracer.exporter
    if isinstance(exporter, OtlpExporter):

        async def start_export() -> None:
            app.nursery.start_soon(exporter.serve)

        async def flush_export() -> None:
            await exporter.close()

        app.before_serving(start_export)
        app.after_serving(flush_export)
    return tracer
