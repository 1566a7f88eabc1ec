"""The mesh service's settings (from ``Config.mesh`` and ``Config.p2p``) and its counters."""

from __future__ import annotations

from dataclasses import dataclass, field

from .liveness import PING_ALL_UP_TO


@dataclass(frozen=True)
class MeshSettings:
    heartbeat_interval: float = 2.0  # shortest gap between announcements for load (mesh.cadence)
    refresh_interval: float = 30.0  # longest silence in a small mesh; peers expire us after miss_limit of them
    refresh_per_peer: float = 10.0  # in a larger one, this many seconds per peer (mesh.cadence.refresh_for)
    refresh_jitter: float = 0.1  # each refresh up to 10 % early: nodes started together do not refresh in step
    load_max_silence: float = 10.0  # a small load change is announced this late at most
    full_view_up_to: int = 32  # more peers: load is asked for when routing, not announced (mesh.load_client)
    miss_limit: int = 3
    liveness_interval: float = 1.0
    liveness_timeout: float = 2.0
    liveness_ping_all_up_to: int = PING_ALL_UP_TO  # more peers: idle ones pinged only if used lately
    liveness_recent: float = 30.0  # "used lately": a request of ours in flight to it within this many seconds
    bootstrap: tuple[str, ...] = ()
    bootstrap_retry_max: float = 30.0
    max_connections: int = 64
    dht_refresh_first: float = 10.0
    dht_refresh_every: float = 60.0
    dht_refresh_max: float = 600.0  # walks that find nobody new back off, doubling, up to this (HostLoops.dht_loop)
    api_url: str = ""
    connect_timeout: float = 10.0  # opening a request stream to a peer (gateway.connect_timeout)
    max_peers: int = 4096  # peer table cap (p2p.max_peers)
    unreachable_retry: float = 5.0  # first retry of a peer no path reached; doubles up to 60 s (mesh.reach)


@dataclass
class MeshCounters:
    """Plain counters, mirrored into Prometheus by the node."""

    heartbeats_sent: int = 0
    heartbeats_received: int = 0
    announced: dict[str, int] = field(default_factory=dict)  # announcements sent, by mesh.cadence.Reason
    synced: dict[str, int] = field(default_factory=dict)  # table syncs (mesh.sync): pulled, served, failed
    load_queries: dict[str, int] = field(default_factory=dict)  # asked, failed, served_* (mesh.load_*)
    holder_lookups: dict[str, int] = field(default_factory=dict)  # lookup, asked, failed, found, none (mesh.holders)
    dropped: dict[str, int] = field(default_factory=dict)
    stream_errors: dict[str, int] = field(default_factory=dict)
    inbound_rejected: dict[str, int] = field(default_factory=dict)
    request_streams: dict[str, int] = field(default_factory=dict)  # "opened" / "reused"
    addrs_dropped: dict[str, int] = field(default_factory=dict)  # announced addresses not used, by reason
    host_restarts: int = 0

    @staticmethod
    def bump(d: dict[str, int], key: str) -> None:
        d[key] = d.get(key, 0) + 1
