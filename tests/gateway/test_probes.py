"""``/healthz`` and ``/readyz``: what orchestrators probe, without a credential,
even on a gateway that needs keys for everything else; and the node's
readiness rules (mesh joined, backend answering, not draining)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import trio

from meshollama.config import load_config
from meshollama.node import readiness

from .fakes import FakeMesh, running_gateway
from .test_roles import _keys


async def test_probes_answer_without_a_credential_on_a_closed_gateway(tmp_path):
    _keys(tmp_path)
    mesh = FakeMesh("12D3KooWself")
    mesh.extra_status["p2p_addrs"] = ["/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWself"]
    with trio.fail_after(20):
        async with running_gateway(mesh, data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.get("/api/tags")).status_code == 401  # closed
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "peer_id": "12D3KooWself", "version": health.json()["version"],
                                     "p2p_addrs": ["/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWself"]}
            state = gw.app.extensions["meshollama"]
            assert (await client.get("/readyz")).json() == {"ready": True, "checks": {}}  # no node: nothing to wait for
            state.readiness = lambda: {"ready": False, "checks": {"mesh": {"ok": False, "detail": "no peer"}}}
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["mesh"]["detail"] == "no peer"
            assert (await client.head("/readyz")).status_code == 503
            assert (await client.post("/readyz")).status_code == 401  # only reads are exempt


class _Mesh:
    def __init__(self, host="running", peers=(), draining=False):
        self._status = {"host": host, "connected_peers": list(peers), "draining": draining}

    def status(self):
        return dict(self._status)


def _backend(kind="ollama", up=True):
    return SimpleNamespace(kind=kind, up=up)


def _ready(mesh, backend, bootstrap=()):
    cfg = load_config(None, {}, {"p2p.bootstrap": list(bootstrap)} if bootstrap else {})
    return readiness(cfg, mesh, backend)


BOOT = "/ip4/198.18.0.1/tcp/4001/p2p/12D3KooWBhJ8qTZ9r5V7xYzE4aBcDeFgHjKmNpQrStUvWxYz1234"


def test_a_lone_node_with_an_answering_backend_is_ready():
    report = _ready(_Mesh(), _backend())
    assert report["ready"] and report["checks"]["backend"]["detail"] == "ollama backend answers"


def test_a_node_with_bootstrap_peers_is_ready_once_one_is_connected():
    assert not _ready(_Mesh(), _backend(), [BOOT])["ready"]
    assert "no peer connected" in _ready(_Mesh(), _backend(), [BOOT])["checks"]["mesh"]["detail"]
    assert _ready(_Mesh(peers=["12D3KooWx"]), _backend(), [BOOT])["ready"]


def test_a_bootstrap_url_that_leads_back_to_this_node_is_no_one_to_wait_for():
    mesh = _Mesh()
    mesh._status["bootstrap_self"] = ["http://meshollama-0.meshollama:11434"]
    assert _ready(mesh, _backend(), ["http://meshollama-0.meshollama:11434"])["ready"]
    assert not _ready(mesh, _backend(), ["http://meshollama-0.meshollama:11434", BOOT])["ready"]


def test_not_ready_while_the_host_restarts_or_the_node_drains():
    assert _ready(_Mesh(host="restarting"), _backend())["checks"]["mesh"] == {"ok": False,
                                                                             "detail": "libp2p host restarting"}
    assert not _ready(_Mesh(draining=True), _backend())["ready"]


def test_backend_down_or_not_probed_yet_is_not_ready_and_no_backend_is():
    assert _ready(_Mesh(), _backend(up=False))["checks"]["backend"] == {"ok": False,
                                                                       "detail": "ollama backend does not answer"}
    assert not _ready(_Mesh(), _backend(up=None))["ready"]
    assert _ready(_Mesh(), SimpleNamespace(kind="embedded"))["ready"]
    assert _ready(_Mesh(), SimpleNamespace(kind="none", up=None))["ready"]
