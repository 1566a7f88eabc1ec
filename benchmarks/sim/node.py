"""One simulated node: the real PeerTable, AnnouncePolicy, DownHints and
RouteStats, plus its server slots (a FIFO behind ``capacity`` slots) and its
counters."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.mesh.announce import Announcement
from meshollama.mesh.cadence import AnnouncePolicy
from meshollama.mesh.hints import DownHints
from meshollama.mesh.peertable import PeerTable
from meshollama.routing import RouteStats

from .params import Params

MODEL = "llama3:latest"
KEY = names.key(MODEL)  # "registry.ollama.ai/library/llama3:latest"
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def fake_peer_id(rng: random.Random) -> str:
    """A string shaped like an Ed25519 libp2p peer id (52 characters)."""
    return "12D3KooW" + "".join(rng.choice(B58) for _ in range(44))


def model_info(rng: random.Random) -> ModelInfo:
    return ModelInfo(name=MODEL, digest="".join(rng.choice("0123456789abcdef") for _ in range(64)),
                     size=4_661_224_676, loaded=True, modified_at="2026-11-01T10:00:00Z",
                     details={"family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_0"},
                     capabilities=("completion",))


@dataclass(eq=False)
class Attempt:
    """One try of one request on one peer."""

    req: Request
    gateway: Node
    peer: str
    started: float
    first_byte_at: float | None = None
    dead: bool = False  # failed (crash, refusal): its later events are ignored
    chunks: int = 0
    service: float = 0.0
    ttfb_work: float = 0.0


@dataclass(eq=False)
class Request:
    rid: int
    arrived: float
    tries: list[str] = field(default_factory=list)
    tried: int = 0
    failures: int = 0
    done_at: float | None = None
    served_by: str | None = None
    failed: bool = False  # every try failed
    kinds: list[str] = field(default_factory=list)  # why each failed try failed


class Node:
    def __init__(self, index: int, params: Params, rng: random.Random, *, serves: bool = True, capacity: int = 2,
                 speed: float = 1.0, gateway: bool = False, tabled: bool = True) -> None:
        self.index = index
        self.pid = fake_peer_id(rng)
        ip = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
        self.addrs = (f"/ip4/{ip}/tcp/4001/p2p/{self.pid}", f"/ip4/{ip}/udp/4001/quic-v1/p2p/{self.pid}")
        self.api_url = f"http://{ip}:11434"
        self.models = (model_info(rng),) if serves else ()
        self.capacity = capacity if serves else 0
        self.speed = speed
        self.gateway = gateway
        self.params = params
        self.policy = AnnouncePolicy(params.cadence(0))
        self.table = (PeerTable(self.pid, interval=params.heartbeat_interval, miss_limit=params.miss_limit,
                                max_peers=1 << 20) if tabled else None)
        self.stats = RouteStats() if gateway else None
        self.catalog = (self.models, self.addrs, False)
        self.seq = 0
        self.alive = False
        self.leaving = False
        self.joined_at: float | None = None
        self.gone_at: float | None = None
        self.conns: set[str] = set()
        self.force = False
        self.wake_gen = 0
        self.wake_at: float | None = None
        self.poll_at: float | None = None  # a publish-loop iteration is due then (loops.POLL)
        self.poll_phase = rng.uniform(0, params.poll)
        self.planned_refresh = 0.0  # the cadence refresh the pending wake-up was planned with
        self.had_neighbours = False  # loops.publish_loop: a first gossip neighbour forces one announcement
        self.last_ann: Announcement | None = None  # what we last published (host.own_message), not a goodbye
        self.said_refresh: list[float] = []  # refresh_ms / 1000 of every announcement, in order (tests)
        # table sync and down hints (mesh.sync, mesh.hints)
        self.signed: dict[str, Announcement] = {}  # mesh.signed: the last accepted heartbeat of each peer
        self.last_pull: float | None = None
        self.served_at: dict[str, float] = {}  # sync server: caller -> when served
        self.hints = DownHints()
        # server
        self.active: list[Attempt] = []
        self.queue: deque[Attempt] = deque()
        self.served = 0
        # gateway / liveness state
        self.inflight_to: dict[str, int] = {}
        self.used: dict[str, float] = {}
        self.misses: dict[str, int] = {}
        self.pinging: set[str] = set()
        self.dialing: set[str] = set()
        self.round_no = 0
        # counters
        self.pings_sent = 0
        self.pings_answered = 0
        self.sync_entries = 0
        self.pulls = 0

    def load(self) -> LoadInfo:
        return LoadInfo(in_flight=len(self.active), capacity=self.capacity, queued=len(self.queue))

    def busy(self) -> int:
        return len(self.active) + len(self.queue)
