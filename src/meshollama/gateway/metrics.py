"""Prometheus metrics of the gateway and of the mesh service.

Both are created on a registry passed in, never the global one, so several
nodes can run in one test process. The gateway increments
:class:`GatewayMetrics`; the mesh service (written elsewhere) increments
:class:`MeshMetrics`, defined here so every metric name lives in one file.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Generation streams last from milliseconds (embeddings) to minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """What the HTTP gateway observes about the requests it serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meshollama_requests_total",
            "Proxied requests answered, by endpoint, model, answering peer and HTTP status"
            " (499: client went away).",
            ["endpoint", "model", "peer", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "meshollama_request_duration_seconds",
            "Time from request start to the last byte of the answer.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "meshollama_time_to_first_byte_seconds",
            "Time from request start to the first response byte relayed from an upstream.",
            ["endpoint"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "meshollama_in_flight_requests",
            "Proxied requests being served now.",
            registry=registry,
        )
        self.retries = Counter(
            "meshollama_retries_total",
            "Requests retried on another peer, by what failed.",
            ["reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "meshollama_upstream_errors_total",
            "Upstream failures seen by the gateway (unavailable, busy, http_5xx, broken, error).",
            ["kind"],
            registry=registry,
        )
        self.stream_errors = Counter(
            "meshollama_stream_errors_total",
            "Responses whose upstream failed after the first byte reached the client.",
            registry=registry,
        )
        self.requests_by_key = Counter(
            "meshollama_api_requests_by_key_total",
            "Requests that passed authentication, by API key (its name, else its id; every JWT"
            " counts as 'jwt', an open gateway's callers as 'anonymous') and role.",
            ["key", "role"],
            registry=registry,
        )
        self.refused = Counter(
            "meshollama_api_refused_total",
            "Requests the gate refused, by reason (unauthenticated, forbidden, no_role, host).",
            ["reason"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "meshollama_queue_depth",
            "Requests waiting in the gateway's queue for a free slot on a holder of the model.",
            ["model"],
            registry=registry,
        )
        self.queue_outcomes = Counter(
            "meshollama_queue_total",
            "Requests that met the queue, by outcome (dispatched, full, timeout, gone).",
            ["outcome"],
            registry=registry,
        )
        self.timeouts = Counter(
            "meshollama_upstream_timeouts_total",
            "Upstreams that went silent: before the first byte (first_byte) or between chunks (stall).",
            ["kind"],
            registry=registry,
        )
        self.resumes = Counter(
            "meshollama_resumes_total",
            "Streams broken mid-way, by outcome (resumed on another peer, refused, no_peer, failed).",
            ["outcome"],
            registry=registry,
        )


class MeshMetrics:
    """What the mesh service observes about peers and the p2p layer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.peers = Gauge(
            "meshollama_peers",
            "Peers in the table, by state (alive, down).",
            ["state"],
            registry=registry,
        )
        self.heartbeats_received = Counter(
            "meshollama_heartbeats_received_total",
            "Heartbeats accepted from peers.",
            registry=registry,
        )
        self.heartbeats_dropped = Counter(
            "meshollama_heartbeats_dropped_total",
            "Heartbeats dropped, by reason (malformed, stale, self, ...).",
            ["reason"],
            registry=registry,
        )
        self.heartbeats_sent = Counter(
            "meshollama_heartbeats_sent_total",
            "Heartbeats this node published.",
            registry=registry,
        )
        self.p2p_stream_errors = Counter(
            "meshollama_p2p_stream_errors_total",
            "libp2p stream failures, by kind.",
            ["kind"],
            registry=registry,
        )
        self.p2p_request_streams = Counter(
            "meshollama_p2p_request_streams_total",
            "Streams carrying requests to peers: newly opened, or an idle kept-alive one reused.",
            ["how"],
            registry=registry,
        )
        self.host_restarts = Counter(
            "meshollama_host_restarts_total",
            "Times the libp2p host failed and was rebuilt (the gateway kept serving meanwhile).",
            registry=registry,
        )
        self.p2p_inbound_rejected = Counter(
            "meshollama_p2p_inbound_rejected_total",
            "Inbound libp2p streams refused, by reason.",
            ["reason"],
            registry=registry,
        )
