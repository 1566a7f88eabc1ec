"""``GET/POST /api/mesh/policy`` over HTTP, attacked: only an admin may post, and only a
newer policy the mesh authority signed is applied; what is refused says why."""

from __future__ import annotations

import time

import httpx
import trio

from meshollama.trust import documents as d
from meshollama.trust.admission import Admission
from meshollama.trust.state import TrustState

from .fakes import FakeMesh, running_gateway
from .test_roles import A, U, _keys, bearer

SELF = "12D3KooWSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLf"
PEER = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


def _policy(key, version, *peers):
    now = int(time.time())
    certs = tuple(d.issue_certificate(key, peer, "serve", now=now, serial="1") for peer in peers)
    return d.sign_policy(key, d.Policy(version=version, certs=certs))


async def test_only_an_admin_posts_and_only_a_newer_signed_policy_applies(tmp_path):
    key = d.SigningAuthority.generate()
    mesh = FakeMesh(SELF)
    mesh.admission = Admission(TrustState(key.authority, SELF), timeout=1.0)
    keys = _keys(tmp_path)
    v1, v2 = _policy(key, 100, SELF), _policy(key, 200, SELF, PEER)
    forged = _policy(d.SigningAuthority.generate(), 300, SELF, PEER)
    with trio.fail_after(10):
        async with running_gateway(mesh, data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            admin, user = bearer(keys[A]), bearer(keys[U])
            post = "/api/mesh/policy"
            r = await client.post(post, headers=user, json={"policy": v2.token})
            assert r.status_code == 403 and mesh.admission.state.policy.version == 0
            assert (await client.post(post, json={"policy": v2.token})).status_code == 401
            for bad in (b"{", b'{"policy": 7}', b"[]"):
                r = await client.post(post, headers=admin, content=bad)
                assert r.status_code == 400 and "expected" in r.json()["error"]
            r = await client.post(post, headers=admin, json={"policy": forged.token})
            assert r.status_code == 400 and "does not verify" in r.json()["error"]
            r = await client.post(post, headers=admin, json={"policy": v2.token})
            assert r.json() == {"applied": True, "version": 200}
            r = await client.post(post, headers=admin, json={"policy": v1.token})  # a replay of an older one
            assert r.status_code == 200 and r.json() == {"applied": False, "version": 200}
            shown = (await client.get(post, headers=user)).json()
            assert shown["mode"] == "closed" and shown["version"] == 200 and shown["policy"] == v2.token
            assert {a["peer"] for a in shown["admitted"]} == {SELF, PEER}


async def test_an_open_mesh_has_no_policy_to_set(tmp_path):
    key = d.SigningAuthority.generate()
    with trio.fail_after(10):
        async with running_gateway(FakeMesh(SELF)) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.get("/api/mesh/policy")).json() == {"mode": "open"}
            r = await client.post("/api/mesh/policy", json={"policy": _policy(key, 1, SELF).token})
            assert r.status_code == 400 and "open mesh" in r.json()["error"]


def test_a_policy_sets_the_routing_strategy_and_the_mesh_wide_keys_of_a_gateway():
    from prometheus_client import CollectorRegistry

    from meshollama import routing
    from meshollama.gateway.app import create_app
    from meshollama.gateway.keystore import new_key
    from meshollama.node import apply_policy

    from .fakes import make_config

    app = create_app(make_config(), FakeMesh(SELF), None, CollectorRegistry())
    state = app.extensions["meshollama"]
    assert not state.keystore.configured and state.proxy.strategy is routing.Strategy.ROUND_ROBIN
    plaintext, entry = new_key("user", "shared")
    apply_policy(app, d.Policy(version=1, routing={"strategy": "random"}, api_keys=(entry,), keys_required=True))
    assert state.proxy.strategy is routing.Strategy.RANDOM
    assert state.keystore.match(plaintext) is not None and state.keystore.configured
    apply_policy(app, d.Policy(version=2, keys_required=True))  # the last shared key withdrawn
    assert state.keystore.match(plaintext) is None and state.keystore.configured
