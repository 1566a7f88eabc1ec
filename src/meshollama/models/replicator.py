"""Keep each model's copy count: learn targets, watch holders, volunteer by rendezvous hashing.

Targets come from ``models.replicas`` (stamp 0), from ``meshollama replicate``
on this node (``POST /api/mesh/replicate``: stamped with the wall clock) and
from peers' heartbeats, where every node repeats the targets it knows, so a
target set on one node reaches all of them and survives that node leaving.
Per model the newest stamp wins; ``copies: 0`` clears a target (it is kept,
so an older one cannot come back). In a closed mesh only targets from peers
the authority admitted as ``admin`` are taken from heartbeats. Targets are
saved in ``<data_dir>/replicas.json`` so a restarted node still knows them.

Every :data:`INTERVAL` seconds the node looks at the mesh and, for each
target, asks :func:`~.placement.volunteers` who should pull; if that is us,
it pulls the model from the holders like ``/api/pull`` does. A failed pull
is retried after :data:`RETRY` seconds. Copies beyond the target are left
alone: a replica is never deleted behind a user's back.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import trio

from .. import names, pace
from ..catalog import ReplicaTarget
from ..mesh.peertable import UP, PeerState
from .placement import Candidate, holders_within, merge, volunteers

log = logging.getLogger("meshollama.models")

INTERVAL = 2.0
RETRY = 60.0
PATIENCE = 600.0  # seconds a volunteer may take to become a holder before the next one is asked
MAX_TARGETS = 256  # targets kept; past it cleared ones go first, then the oldest
FUTURE = 24 * 3600 * 1000  # ms: a stamp further ahead than this is a forgery (it would win for ever)
_LABEL = re.compile(r"[A-Za-z0-9_.:=-]{1,64}\Z")
STATE_FILE = "replicas.json"


def _config_targets(specs) -> list[ReplicaTarget]:
    out = []
    for spec in specs:
        name, _, copies = spec.rpartition("=")
        out.append(ReplicaTarget(names.shortest(name), int(copies), 0))
    return out


class Replicator:
    def __init__(self, config: Any, mesh: Any, service: Any, *, data_dir: Path | None = None,
                 interval: float = INTERVAL) -> None:
        self.config = config
        self.mesh = mesh
        self.service = service
        self.interval = interval
        self.grace = float(config.replica_grace)
        self._path = Path(data_dir) / STATE_FILE if data_dir is not None else None
        self._known: dict[str, ReplicaTarget] = merge(_config_targets(config.replicas) + self._load(), names.key)
        self._seen: dict[str, dict[str, float]] = {}  # model key -> peer -> last seen holding it
        self._retry_at: dict[str, float] = {}
        self._pulling: set[str] = set()
        self._expected: dict[tuple[str, str], float] = {}  # (model key, volunteer) -> since when
        self.patience = max(PATIENCE, 5 * self.grace)
        self.last_error: dict[str, str] = {}

    # --- targets ------------------------------------------------------------------------------

    def targets(self) -> tuple[ReplicaTarget, ...]:
        """What our heartbeat carries: every target we know, newest first."""
        return tuple(sorted(self._known.values(), key=lambda t: -t.stamp))

    def target(self, name: str) -> ReplicaTarget | None:
        t = self._known.get(names.key(name))
        return t if t is not None and t.copies > 0 else None

    def set_target(self, name: str, copies: int, labels: tuple[str, ...] = ()) -> ReplicaTarget:
        key = names.key(name)
        old = self._known.get(key)
        stamp = max(int(time.time() * 1000), (old.stamp + 1) if old else 0)
        target = ReplicaTarget(names.shortest(name), copies, stamp, tuple(labels))
        if not _valid(target):
            from ..errors import BadRequest

            raise BadRequest("copies must be 0 to 64 and labels letters, digits and _.:=- (64 characters at most)")
        self._known[key] = target
        self._bound()
        self._retry_at.pop(key, None)
        self._save()
        self.mesh.request_heartbeat()
        log.info("copy count of %s set to %d%s", target.model, copies,
                 f" on nodes labelled {', '.join(labels)}" if labels else "")
        return target

    def _learn(self, snapshot) -> None:
        admission = getattr(self.mesh, "admission", None)
        heard = []
        for peer in snapshot.peers:
            if peer.is_self or not peer.replicas:
                continue
            if admission is not None and admission.known_role(peer.peer_id) != "admin":
                continue  # a closed mesh takes copy counts from its admins only
            heard.extend(t for t in peer.replicas if _valid(t))
        merged = merge([*self._known.values(), *heard], names.key)
        if merged != self._known:
            self._known = merged
            self._bound()
            self._save()

    def _bound(self) -> None:
        if len(self._known) > MAX_TARGETS:
            keep = sorted(self._known.items(), key=lambda kv: (kv[1].copies > 0, kv[1].stamp), reverse=True)
            self._known = dict(keep[:MAX_TARGETS])

    def _load(self) -> list[ReplicaTarget]:
        if self._path is None:
            return []
        try:
            data = json.loads(self._path.read_text())
            out = []
            for t in data["targets"]:
                if isinstance(t.get("model"), str) and names.is_valid(t["model"]):
                    target = ReplicaTarget(names.shortest(t["model"]), int(t["copies"]), int(t["stamp"]),
                                           tuple(t.get("labels", ())))
                    if _valid(target):
                        out.append(target)
            return out
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", self._path, exc)
            return []

    def _save(self) -> None:
        if self._path is None:
            return
        data = {"targets": [{"model": t.model, "copies": t.copies, "stamp": t.stamp, "labels": list(t.labels)}
                            for t in self.targets()]}
        try:
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(self._path)
        except OSError as exc:
            log.warning("cannot save copy counts to %s: %s", self._path, exc)

    # --- placement ----------------------------------------------------------------------------

    def holders(self, key: str, now: float) -> set[str]:
        return holders_within(self._seen.get(key, {}), now, self.grace)

    def _observe(self, snapshot, now: float) -> None:
        for peer in snapshot.peers:
            if peer.state not in UP:
                continue
            # A node pulling a copy counts as holding it: its claimed space lowers the free
            # room it announces, and the next node in the ranking must not start one too.
            pulling = peer.store.pulling if peer.store is not None else ()
            for name in [m.name for m in peer.models] + list(pulling):
                self._seen.setdefault(names.key(name), {})[peer.peer_id] = now

    def decide(self, snapshot, now: float) -> list[str]:
        """Models this node should pull now (and not already pulling or backing off)."""
        self._learn(snapshot)
        self._observe(snapshot, now)
        me = self.mesh.self_id
        candidates = [Candidate(p.peer_id, p.store, p.state is PeerState.ALIVE or p.is_self) for p in snapshot.peers]
        out = []
        for key, target in self._known.items():
            if target.copies <= 0 or key in self._pulling or now < self._retry_at.get(key, 0.0):
                continue
            size = max((m.size for p in snapshot.peers if (m := p.model(key)) is not None), default=-1)
            if size < 0:
                continue  # nobody holds it: nothing to copy from
            holders = self.holders(key, now)
            slow = {pid for (k, pid), since in self._expected.items() if k == key and now - since > self.patience}
            chosen = volunteers(key, target, size, holders, [c for c in candidates if c.peer_id not in slow])
            for pid in chosen:  # a volunteer that never becomes a holder is skipped after PATIENCE
                self._expected.setdefault((key, pid), now)
            for k, pid in list(self._expected):  # done: it holds the model, or nobody is needed
                if k == key and (pid in holders or (not chosen and pid not in slow)):
                    del self._expected[(k, pid)]
            if me in chosen:
                out.append(key)
        return out

    def status(self, key: str, now: float) -> dict:
        t = self._known.get(key)
        return {"copies_target": t.copies if t is not None and t.copies > 0 else None,
                "labels": list(t.labels) if t is not None and t.labels else [],
                "replicating": key in self._pulling, "last_error": self.last_error.get(key)}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for key in self.decide(self.mesh.snapshot(), now):
                    self._pulling.add(key)
                    nursery.start_soon(self._replicate, key)
                await pace.tick(self.interval)

    async def _replicate(self, key: str) -> None:
        target = self._known[key]
        log.info("replicating %s: this node volunteers for one of its %d copies", target.model, target.copies)

        async def quiet(_: dict) -> None:
            pass

        try:
            await self.service.pull(target.model, quiet, reserve=self.config.min_free_bytes)
            self.last_error.pop(key, None)
            log.info("replicated %s", target.model)
        except Exception as exc:  # PullError, NotInMesh, BadRequest, OSError: try again later
            from .blob_fetch import leaf

            err = leaf(exc)
            self.last_error[key] = str(err) or type(err).__name__
            self._retry_at[key] = trio.current_time() + RETRY
            log.warning("replicating %s failed (retry in %d s): %s", target.model, RETRY, exc)
        finally:
            self._pulling.discard(key)


def _valid(t: ReplicaTarget) -> bool:
    """A target we may keep and repeat: bounded, not stamped in the future, plain labels."""
    return (0 <= t.copies <= 64 and 0 <= t.stamp <= time.time() * 1000 + FUTURE
            and len(t.labels) <= 16 and all(isinstance(x, str) and _LABEL.match(x) for x in t.labels))
