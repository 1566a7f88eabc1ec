"""Prometheus metrics of the gateway and of the mesh service.

Both are created on a registry passed in, never the global one, so several
nodes can run in one test process. The gateway increments
:class:`GatewayMetrics`; the mesh service (written elsewhere) increments
:class:`MeshMetrics`, defined here so every metric name lives in one file.
The model service's three counters (``meshollama_model_bytes_total``,
``meshollama_model_pulls_total``, ``meshollama_blob_requests_refused_total``)
are the exception: they live in ``models/service.py``.
docs/observability.md describes every metric, the alerts built on them and
the dashboard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import names

# Generation streams last from milliseconds (embeddings) to minutes.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_KINDS = ("in_flight", "capacity", "queued", "waiting")  # meshollama_peer_load{kind}: catalog.LoadInfo's fields
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
        self.peer_ttfb = Histogram(
            "meshollama_peer_time_to_first_byte_seconds",
            "Time from sending a request to a peer (or this node's backend) to its first byte, by"
            " answering peer and model: each peer's latency per model, retries and resumes included.",
            ["peer", "model"],
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


DROP_REASONS = ("malformed", "signer_mismatch", "not_admitted", "stale", "table_full", "junk_rpc",
                "sync_invalid", "sync_not_own")


class MeshMetrics:
    """What the mesh service observes about peers and the p2p layer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.peers = Gauge(
            "meshollama_peers",
            "Peers in the table (this node not counted), by state (alive, draining, down, unreachable).",
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
        # Every reason's series exists from the start, at 0: a quiet mesh (announcements
        # are rare now) may drop none for a long time, and rules and panels still need one.
        for reason in DROP_REASONS:
            self.heartbeats_dropped.labels(reason)
        self.heartbeats_sent = Counter(
            "meshollama_heartbeats_sent_total",
            "Announcements this node published, by reason (first, forced, catalog, load, load_silence, refresh).",
            ["reason"],
            registry=registry,
        )
        self.last_announcement = Gauge(
            "meshollama_last_announcement_timestamp_seconds",
            "Unix time of this node's last published announcement.",
            registry=registry,
        )
        self.announce_refresh = Gauge(
            "meshollama_announce_refresh_seconds",
            "The refresh interval this node announces: peers expire it after miss_limit of them without news.",
            registry=registry,
        )
        self.table_syncs = Counter(
            "meshollama_table_syncs_total",
            "Table syncs (/meshollama/sync/1): pulled, failed, served, refused_*.",
            ["outcome"],
            registry=registry,
        )
        self.load_queries = Counter(
            "meshollama_load_queries_total",
            "Load questions in a large mesh (/meshollama/load/1): asked, failed, served_*.",
            ["outcome"],
            registry=registry,
        )
        self.holder_lookups = Counter(
            "meshollama_holder_lookups_total",
            "Holders of a model no announcement lists, looked up in the DHT (mesh.holders): lookup "
            "(the DHT was asked), asked and failed (holds questions to providers), found, none. "
            "Holds questions answered for others count in load_queries.",
            ["outcome"],
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
        self.addrs_dropped = Counter(
            "meshollama_announced_addrs_dropped_total",
            "Addresses in peers' heartbeats not used, by reason (foreign_or_invalid, over_limit).",
            ["reason"],
            registry=registry,
        )
        # Set from the peer table when /metrics is scraped (observe): per-peer series so that
        # an alert can name the peer, not only count them.
        self.peer_state = Gauge(
            "meshollama_peer_state",
            "Each peer in the table (this node not included): 1 for its state now, 0 for the"
            " other states (alive, draining, down, unreachable).",
            ["peer", "state"],
            registry=registry,
        )
        self.peer_load = Gauge(
            "meshollama_peer_load",
            "What each peer (this node included) last announced: requests in_flight, slot"
            " capacity, queued in its backend, waiting in its gateway's queue.",
            ["peer", "kind"],
            registry=registry,
        )
        self.model_copies = Gauge(
            "meshollama_model_copies",
            "Peers up (alive or draining, this node included) that announce each model; 0 for a"
            " model with a copy-count target and no holder.",
            ["model"],
            registry=registry,
        )
        self.model_copies_target = Gauge(
            "meshollama_model_copies_target",
            "Copy count set for a model (meshollama replicate), as this node knows it.",
            ["model"],
            registry=registry,
        )
        self.node_info = Gauge(
            "meshollama_node_info",
            "Always 1: this node's peer id and version (join on instance to name a node by peer).",
            ["peer", "version"],
            registry=registry,
        )
        self.node_draining = Gauge(
            "meshollama_node_draining",
            "1 while this node drains for a restart (meshollama drain, SIGUSR1).",
            registry=registry,
        )
        self.p2p_host_up = Gauge(
            "meshollama_p2p_host_up",
            "1 while the libp2p host runs, 0 while a failed one is rebuilt (or the first starts).",
            registry=registry,
        )
        self.p2p_connected_peers = Gauge(
            "meshollama_p2p_connected_peers",
            "Peers with an open libp2p connection to this node.",
            registry=registry,
        )
        self.start_time = Gauge(
            "meshollama_node_start_time_seconds",
            "When this node started, in Unix time (a restart shows as a change).",
            registry=registry,
        )
        self.start_time.set_to_current_time()
        self._shown: dict[str, set] = {"peers": set(), "loads": set(), "models": set(), "targets": set()}
        self._info: tuple[str, str] | None = None

    def observe(self, snapshot: Any, status: dict, targets: Iterable[Any] = ()) -> None:
        """Set the gauges from a peer table snapshot (``mesh.Snapshot``), the mesh
        service's ``status()`` and the copy-count targets it knows. Series of
        peers and models no longer there are removed, so a peer that left does
        not stay "down" on a dashboard for ever."""
        states = ("alive", "draining", "down", "unreachable")
        counts = dict.fromkeys(states, 0)
        peers, loads, copies = set(), set(), {}
        for peer in snapshot.peers:
            pid = peer.peer_id
            load = peer.load
            for kind in LOAD_KINDS:
                self.peer_load.labels(pid, kind).set(getattr(load, kind))
            loads.add(pid)
            if peer.state.value in ("alive", "draining"):
                for model in {names.shortest(names.key(m.name)) for m in peer.models}:
                    copies[model] = copies.get(model, 0) + 1
            if peer.is_self:
                continue
            state = peer.state.value
            counts[state] = counts.get(state, 0) + 1
            for s in states:
                self.peer_state.labels(pid, s).set(1 if s == state else 0)
            peers.add(pid)
        for state, n in counts.items():
            self.peers.labels(state).set(n)
        wanted = {}
        for target in targets:
            if target.copies > 0:
                wanted[names.shortest(names.key(target.model))] = target.copies
        for model, n in wanted.items():
            self.model_copies_target.labels(model).set(n)
            copies.setdefault(model, 0)
        for model, n in copies.items():
            self.model_copies.labels(model).set(n)
        self._forget("peers", peers, self.peer_state, states)
        self._forget("loads", loads, self.peer_load, LOAD_KINDS)
        self._forget("models", set(copies), self.model_copies)
        self._forget("targets", set(wanted), self.model_copies_target)

        self_id, version = status.get("peer_id", ""), status.get("version", "")
        if self._info != (self_id, version):
            self.node_info.clear()
            self.node_info.labels(self_id, version).set(1)
            self._info = (self_id, version)
        self.node_draining.set(1 if status.get("draining") else 0)
        self.p2p_host_up.set(1 if status.get("host") == "running" else 0)
        self.p2p_connected_peers.set(len(status.get("connected_peers", ())))
        if status.get("refresh_interval"):
            self.announce_refresh.set(status["refresh_interval"])

    def _forget(self, kind: str, now: set, gauge: Gauge, second: tuple[str, ...] = ()) -> None:
        """Remove the series of ``gauge`` whose first label was shown last time and is gone now."""
        for gone in self._shown[kind] - now:
            for labels in [(gone, x) for x in second] or [(gone,)]:
                try:
                    gauge.remove(*labels)
                except KeyError:  # never set under those labels
                    pass
        self._shown[kind] = now
