"""The daemon: wires identity, backend, mesh and gateway together and runs them.

Start order matters: the backend first (so the first heartbeat already lists
our models), then the gateway (so its bound URL goes into heartbeats and
node.json), then the mesh. Shutdown (SIGINT/SIGTERM): the mesh announces
that we leave, everything is cancelled, the libp2p host closes its
connections (shielded, time-boxed), and the process exits 0 within a few
seconds. A second signal exits at once.

Drain (SIGUSR1, ``meshollama drain`` = ``POST /api/mesh/drain``), for
rolling restarts: the node announces that it drains, so peers stop routing
new requests to it; its gateway answers new requests 503 with
``Retry-After`` (a load balancer moves them on); the requests in flight,
ours and those peers sent us, finish, for up to ``gateway.drain_timeout``
(streams still running then break, and the gateways that sent them resume
them on another peer); then the node leaves as on SIGTERM and exits 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from . import __version__, identity
from .catalog import LoadInfo
from .config import Config
from .gateway.endpoints import peer_policy
from .limits import InboundLimiter
from .mesh.service import MeshService
from .p2p.httpstream import HttpStreamServer
from .node_setup import NodeInfo, host_settings, mesh_settings, write_node_file

log = logging.getLogger("meshollama.node")

class Node:
    """One meshollama node. ``await nursery.start(node.serve)`` returns its NodeInfo."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.mesh: MeshService | None = None
        self.admission = None  # trust.admission.Admission in a closed mesh
        self.info: NodeInfo | None = None
        self.drained = trio.Event()  # set once a drain has let the in-flight work finish
        self._drain_since: float | None = None
        self._nursery: trio.Nursery | None = None
        self._idle: list = []  # () -> bool: no work in flight (gateway, backend, inbound streams)
        self._gateway = None  # gateway.app.GatewayState
        self._limiter: InboundLimiter | None = None
        self.models = None  # models.service.ModelService

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .backends.select import select_backend
        from .gateway.app import EXTENSION, create_app
        from .gateway.metrics import MeshMetrics
        from .gateway.server import serve_gateway, tls_from_config

        cfg = self.config
        data_dir = Path(cfg.node.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        key_pair = identity.load_or_create(data_dir)
        psk = identity.read_psk(cfg.p2p.psk_file) if cfg.p2p.psk_file else None
        selected = await select_backend(cfg)
        backend = selected.backend
        mesh_metrics = MeshMetrics(self.registry)
        self.admission = admission = build_admission(cfg, data_dir, key_pair)
        limiter = InboundLimiter(cfg.p2p.max_inbound_streams, cfg.p2p.max_inbound_per_peer)

        def http_server(on_reject, on_error) -> HttpStreamServer:
            p2p = cfg.p2p
            from .tracing import OFF, ServedBackend  # peers' requests: serve/backend spans, traceparent to the backend
            served = ServedBackend(backend, app.extensions[EXTENSION].tracer if app is not None else OFF)
            return HttpStreamServer(served, limiter, max_request_bytes=p2p.max_request_bytes,
                                    max_buffered_bytes=p2p.max_buffered_bytes, request_timeout=p2p.request_timeout,
                                    on_reject=on_reject, on_error=on_error,
                                    allow=peer_policy(admission))

        def load() -> LoadInfo:
            # Requests waiting in our gateway's line go out as `waiting`: the mesh sees unmet demand.
            base = backend.load()
            waiting = app.extensions[EXTENSION].proxy.queues.total() if app is not None else 0
            return dataclasses.replace(base, waiting=waiting) if waiting else base

        app = None
        mesh = MeshService(
            key_pair,
            host_settings(cfg, psk),
            mesh_settings(cfg, ""),
            models=backend.models,
            load=load,
            changed=backend.changed,
            local_upstream=backend,
            http_server_factory=http_server,
            on_counter=_counter_sink(mesh_metrics),
            admission=admission,
        )
        self.mesh = mesh
        app = create_app(cfg, mesh, backend, self.registry)
        self._gateway = gateway = app.extensions[EXTENSION]
        self.models = models = _model_service(cfg, mesh, backend, self.registry)
        gateway.proxy.models = gateway.models = models
        gateway.drain = self.drain
        gateway.readiness = partial(readiness, cfg, mesh, backend)
        self._limiter = limiter
        self._idle = [lambda: gateway.proxy.in_flight == 0, lambda: backend.load().in_flight == 0,
                      lambda: limiter.in_use == 0]
        if admission is not None:  # before the gateway serves: mesh-wide keys close it from the start
            admission.on_policy = partial(apply_policy, app)
            apply_policy(app, admission.state.policy)

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for service in selected.services:
                await nursery.start(service.serve)
            await nursery.start(backend.serve)
            if models is not None:
                await nursery.start(models.serve)
            tls = tls_from_config(cfg.gateway)
            bound = await nursery.start(partial(serve_gateway, app, cfg.gateway.listen, tls=tls))
            api_url = f"{'https' if tls else 'http'}://{bound}"

            mesh.settings = dataclasses.replace(mesh.settings, api_url=api_url)
            addrs = await nursery.start(mesh.serve)
            gateway.before_scrape.append(partial(_observe_peers, mesh, mesh_metrics))
            self.info = NodeInfo(mesh.self_id, tuple(addrs), api_url, backend.kind)
            write_node_file(data_dir, self.info)
            log.info("node %s up: backend=%s api=%s p2p=%s", mesh.self_id, backend.kind, api_url, " ".join(addrs))
            task_status.started(self.info)

    def drain(self) -> dict:
        """Start draining (idempotent); what it looks like now."""
        mesh = self.mesh
        if mesh is None or self._nursery is None:
            raise RuntimeError("the node is not running")
        if self._drain_since is None:
            self._drain_since = trio.current_time()
            log.warning("draining: no new requests; %d s for those in flight", self.config.gateway.drain_timeout)
            mesh.set_draining(True)
            if self._gateway is not None:
                self._gateway.proxy.draining = True
            if self._limiter is not None:  # a peer whose view is stale hears "busy" and tries another
                self._limiter.closed = True
            self._nursery.start_soon(self._drain)
        return {"draining": True, "since_seconds": round(trio.current_time() - self._drain_since, 3),
                "idle": all(check() for check in self._idle), "drain_timeout": self.config.gateway.drain_timeout}

    async def _drain(self) -> None:
        with trio.move_on_after(self.config.gateway.drain_timeout) as timer:
            # Let peers hear the draining heartbeat before judging idleness.
            await trio.sleep(0.1)
            while not all(check() for check in self._idle):
                await trio.sleep(0.05)
        if timer.cancelled_caught:
            log.warning("drain timeout: leaving with work in flight (peers resume their streams elsewhere)")
        else:
            log.info("drained: nothing in flight")
        self.drained.set()

    async def leave(self) -> None:
        """Announce that we leave; call before cancelling ``serve``."""
        if self.mesh is not None:
            await self.mesh.leave()


def readiness(cfg: Config, mesh: MeshService, backend) -> dict:
    """What ``GET /readyz`` answers: ready once the mesh is joined and the backend answers.

    Joined: the libp2p host runs and, when bootstrap peers other than this
    node are configured, at least one peer is connected (a node with no
    bootstrap is a mesh of its own until others dial it). A draining node is not ready: orchestrators stop
    sending it requests while it finishes those in flight.
    """
    status = mesh.status()
    connected = len(status["connected_peers"])
    # A bootstrap URL that leads back to this node (pod 0 of a StatefulSet) is no one to wait for.
    others = [b for b in cfg.p2p.bootstrap if b not in status.get("bootstrap_self", ())]
    if status["host"] != "running":
        joined = (False, f"libp2p host {status['host']}")
    elif status["draining"]:
        joined = (False, "draining for a restart")
    elif others and not connected:
        joined = (False, f"no peer connected yet ({len(others)} bootstrap entries)")
    else:
        joined = (True, f"{connected} peers connected")
    up = getattr(backend, "up", True)
    if backend.kind == "none":
        answering = (True, "no backend: this node routes to peers only")
    elif up is None:
        answering = (False, f"{backend.kind} backend not probed yet")
    else:
        answering = (bool(up), f"{backend.kind} backend {'answers' if up else 'does not answer'}")
    checks = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in (("mesh", joined), ("backend", answering))}
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


def _model_service(cfg: Config, mesh: MeshService, backend, registry):
    """Model distribution (models/): serve our blobs, pull from peers, keep copy counts."""
    from .models.wire import PROTOCOL as BLOB_PROTOCOL
    from .models.replicator import Replicator
    from .models.service import ModelService, build_store

    try:
        store = build_store(cfg, backend)
    except OSError as exc:
        log.warning("models: no model store (%s): models are not shared over the mesh", exc)
        store = None
    models = ModelService(cfg, mesh, backend, store, registry)
    mesh.handlers[BLOB_PROTOCOL] = models.server.handle
    mesh.store_info = models.store_info
    models.replicator = Replicator(cfg.models, mesh, models, data_dir=Path(cfg.node.data_dir))
    mesh.replica_targets = models.replicator.targets
    return models


def build_admission(cfg: Config, data_dir: Path, key_pair):
    """The admission of a closed mesh (``mesh.authority`` or ``meshollama mesh init``), or
    None for an open one, with a warning when the open mesh listens beyond loopback."""
    from .p2p.keys import peer_id_of
    from .trust.admission import Admission
    from .trust.state import TrustState, configured_authority

    authority = configured_authority(data_dir, cfg.mesh.authority)
    if authority is None:
        if any(not _loopback_listen(a) for a in cfg.p2p.listen):
            log.warning("open mesh: anyone who reaches %s can join and receive requests; "
                        "close it with `meshollama mesh init` (docs/security.md)", ", ".join(cfg.p2p.listen))
        return None
    state = TrustState(authority, peer_id_of(key_pair), data_dir)
    state.load(time.time())
    if state.own is None:
        log.warning("this node is not admitted to the mesh of %s yet: the operator runs "
                    "`meshollama admit %s`", authority.text, state.self_id)
    return Admission(state, timeout=cfg.mesh.admission_timeout)


def apply_policy(app, policy) -> None:
    """What the mesh policy sets on this node's gateway: API keys shared mesh-wide
    (hashes only) and the routing strategy, when the policy names one."""
    from . import routing
    from .gateway.app import EXTENSION

    state = app.extensions[EXTENSION]
    state.keystore.set_shared([dict(k) for k in policy.api_keys], required=policy.keys_required)
    strategy = policy.routing.get("strategy")
    if strategy:
        state.proxy.strategy = routing.Strategy(strategy)


def _loopback_listen(addr: str) -> bool:
    parts = addr.split("/")
    return len(parts) > 2 and (parts[2].startswith("127.") or parts[2] == "::1")


def _counter_sink(metrics):
    """Mirror the mesh service's plain counters into Prometheus."""

    def count(name: str, label: str) -> None:
        if name == "heartbeats_sent":
            metrics.heartbeats_sent.labels(label or "refresh").inc()
            metrics.last_announcement.set(time.time())
        elif name == "synced":
            metrics.table_syncs.labels(label).inc()
        elif name == "load_queries":
            metrics.load_queries.labels(label).inc()
        elif name == "holder_lookups":
            metrics.holder_lookups.labels(label).inc()
        elif name == "heartbeats_received":
            metrics.heartbeats_received.inc()
        elif name == "heartbeats_dropped":
            metrics.heartbeats_dropped.labels(label).inc()
        elif name == "stream_errors":
            metrics.p2p_stream_errors.labels(label).inc()
        elif name == "inbound_rejected":
            metrics.p2p_inbound_rejected.labels(label).inc()
        elif name == "request_streams":
            metrics.p2p_request_streams.labels(label).inc()
        elif name == "host_restarts":
            metrics.host_restarts.inc()
        elif name == "addrs_dropped":
            metrics.addrs_dropped.labels(label).inc()

    return count


def _observe_peers(mesh: MeshService, metrics) -> None:
    """Peers by state, each peer's state and load, copies of each model, this node's state:
    set on every scrape of /metrics (a loop that set them every second cost an idle node
    ~1.5 ms a second at 25 peers, most of what it spent with nobody asking)."""
    metrics.observe(mesh.snapshot(), mesh.status(), mesh.replica_targets())


async def run_until_signalled(config: Config, *, out=sys.stdout) -> int:
    """Run a node until SIGINT/SIGTERM; print how to reach it once it is up."""
    node = Node(config)
    faults = os.environ.get("MESHOLLAMA_TEST_FAULTS") == "1"  # the fault suite's hook, never set in use
    watched = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1] + ([signal.SIGUSR2] if faults else [])
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:
            info: NodeInfo = await nursery.start(node.serve)
            print(f"meshollama {__version__} node {info.peer_id}", file=out)
            print(f"  backend: {info.backend}", file=out)
            print(f"  api:     {info.api_url}", file=out)
            for addr in info.p2p_addrs:
                print(f"  p2p:     {addr}", file=out)
            print(f"  others join with: meshollama start --bootstrap {info.p2p_addrs[0]}", file=out)
            out.flush()

            async def leave_when_drained() -> None:
                await node.drained.wait()
                await node.leave()
                nursery.cancel_scope.cancel()
                trio.lowlevel.spawn_system_task(_hard_exit_after, HARD_EXIT_AFTER)

            nursery.start_soon(leave_when_drained)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    log.info("received SIGUSR1: draining")
                    node.drain()
                    continue
                if signum == getattr(signal, "SIGUSR2", None):
                    node.mesh.inject_host_failure()
                    continue
                log.info("received %s: shutting down", signal.Signals(signum).name)
                await node.leave()
                nursery.cancel_scope.cancel()
                trio.lowlevel.spawn_system_task(_hard_exit_on_second_signal, signals)
                trio.lowlevel.spawn_system_task(_hard_exit_after, HARD_EXIT_AFTER)
                break
    return 0


# Once shutting down, the process exits within this many seconds whatever is left:
# a client that stopped reading blocks a socket write that Hypercorn shields from
# cancellation, so its connection would otherwise keep the node alive for ever.
HARD_EXIT_AFTER = 25.0  # gateway.server: 10 s of grace for answers + 2 s slack, and leaving the mesh


async def _hard_exit_after(seconds: float) -> None:
    await trio.sleep(seconds)
    log.warning("still shutting down after %.0f s (a client that stopped reading?): exiting now", seconds)
    logging.shutdown()
    os._exit(0)


async def _hard_exit_on_second_signal(signals) -> None:
    try:
        async for _ in signals:
            os._exit(130)
    except Exception:
        pass
