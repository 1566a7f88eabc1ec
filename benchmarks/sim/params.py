"""Every constant of the model, in one place (the CLI exposes them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from meshollama.mesh import announce, hints, sync
from meshollama.mesh.cadence import MIN_GAP, Cadence, refresh_for
from meshollama.mesh.liveness import PING_ALL_UP_TO


@dataclass
class Params:
    mode: str = "new"  # "new": the code at HEAD; "legacy": a full announcement every heartbeat (before 18fde4b)
    # gossip model
    degree: int = 3  # D: gossip mesh degree (p2p.gossip_degree); copies received and sent per message per node
    hop_delay: float = 0.005  # seconds per gossip hop
    hop_jitter: float = 0.002  # uniform extra delay per message
    loss: float = 0.0  # chance that one node misses one announcement (gossip is lossless at 0)
    # cost calibration (see scenarios.calibrate and the docs: fitted to the real-node measurements)
    base_cpu_pct: float = 0.35  # % of a core: a lone idle node (measured)
    rpc_ms: float = 2.0  # CPU ms per pubsub RPC copy sent or received (fitted: scenarios.calibrate says 2.03)
    ping_ms: float = 2.2  # CPU ms per liveness ping sent or answered (fitted: scenarios.calibrate says 2.22)
    sync_entry_ms: float = 0.05  # CPU ms per heartbeat a table sync carries (framing, each side)
    sync_verify_ms: float = 1.0  # CPU ms per synced heartbeat the caller did not hold (signature check, apply)
    # cadence (mesh.cadence, loops.cadence_now) and table
    refresh_interval: float = 30.0  # p2p.refresh_interval: the floor
    refresh_per_peer: float = 10.0  # p2p.refresh_per_peer
    refresh_ceiling: float = announce.MAX_REFRESH_MS / 1000  # 600 s
    load_gap: float = 2.0  # = p2p.heartbeat_interval
    load_silence: float = 10.0  # p2p.load_max_silence
    heartbeat_interval: float = 2.0  # PeerTable interval; legacy cadence period
    miss_limit: int = 3
    poll: float = 0.25  # loops.POLL at 138080b: the publish loop looks at load / neighbours this often
    # 880a644 (after this model): past p2p.full_view_up_to (32) peers load is not announced but asked
    # for by gateways (mesh.load_client, NOT modelled); set 32 to see the gossip part of that rule
    announce_load_up_to: int = 1 << 30
    expire_every: float = 1.0  # the node calls expire() every heartbeat_interval / 2
    # what happens on a connection (loops.on_event)
    forced_on_connect: bool = False  # every new connection forces an announcement (the code before 18fde4b)
    pull: bool = True  # pull the new peer's table (mesh.sync), at most once per pull_every
    pull_every: float = sync.PULL_EVERY  # 60 s
    sync_tries: int = 3  # loops.SYNC_TRIES
    sync_retry: float = 2.0  # loops.SYNC_RETRY
    serve_every: float = sync.SERVE_EVERY  # a server serves one caller at most this often
    hints: bool = True  # down hints (mesh.hints)
    # liveness (mesh.settings defaults)
    liveness_interval: float = 1.0
    liveness_timeout: float = 2.0
    liveness_recent: float = 30.0
    ping_all_up_to: int = PING_ALL_UP_TO
    # connections and requests
    connect_delay: float = 0.05  # a dial that works
    dial_fail: float = 0.2  # a dial to a dead peer fails after this
    rtt: float = 0.002
    retries: int = 2  # gateway.retries
    sideline: float = 10.0  # gateway.sideline_seconds
    # loops.accept dials every announced peer it is not connected to (mesh.reach.maybe_dial),
    # up to p2p.max_connections; off: connections are bootstrap + D gossip neighbours + request peers
    dial_announced: bool = False
    max_connections: int = 64

    @classmethod
    def for_mode(cls, base: Params | None, mode: str) -> Params:
        """``base`` for ``mode``: legacy is the code before 18fde4b (every connection
        forces an announcement, no table pull, no down hints)."""
        p = dataclasses.replace(base or cls(), mode=mode)
        if mode == "legacy":
            p.forced_on_connect, p.pull, p.hints = True, False, False
        return p

    def legacy_cadence(self) -> Cadence:
        hb = self.heartbeat_interval
        return Cadence(refresh=hb, load_gap=hb, load_silence=hb, min_gap=min(hb, MIN_GAP))

    def refresh_for(self, peers: int) -> float:
        """loops.HostLoops.cadence_now's refresh for a table of ``peers`` others."""
        return max(self.heartbeat_interval, refresh_for(peers, floor=self.refresh_interval,
                                                        per_peer=self.refresh_per_peer,
                                                        ceiling=self.refresh_ceiling))

    def cadence(self, peers: int) -> Cadence:
        if self.mode == "legacy":
            return self.legacy_cadence()
        beat = self.heartbeat_interval
        kw = {} if peers <= self.announce_load_up_to else {"announce_load": False}
        return Cadence(refresh=self.refresh_for(peers), load_gap=beat, load_silence=max(beat, self.load_silence),
                       min_gap=min(beat, MIN_GAP), **kw)

    def cpu_pct(self, rpc_per_s: float, pings_per_s: float, sync_per_s: float, verify_per_s: float = 0.0) -> float:
        """CPU-equivalent % of one core per node."""
        ms = (rpc_per_s * self.rpc_ms + pings_per_s * self.ping_ms + sync_per_s * self.sync_entry_ms
              + verify_per_s * self.sync_verify_ms)
        return self.base_cpu_pct + ms / 10.0


HINT_DELAY = hints.DELAY
