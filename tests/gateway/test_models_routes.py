"""The model-distribution routes attacked: who may set a copy count, what a
malformed one gets, and a closed-mesh node that is not an admin."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import trio

from meshollama.gateway.endpoints import peer_may_call

from .fakes import FakeMesh, running_gateway
from .test_roles import A, R, U, _keys, bearer


class Replicator:
    def __init__(self):
        self.asked = []

    def set_target(self, model, copies, labels):
        self.asked.append((model, copies, labels))
        return SimpleNamespace(model=model, copies=copies, labels=labels, stamp=1)


async def test_only_an_admin_may_set_a_copy_count_and_bodies_are_checked(tmp_path):
    keys = _keys(tmp_path)
    rep = Replicator()
    with trio.fail_after(10):
        async with running_gateway(FakeMesh(), data_dir=tmp_path) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            gw.app.extensions["meshollama"].models = SimpleNamespace(replicator=rep)
            body = {"model": "m:1b", "copies": 3}
            assert (await client.post("/api/mesh/replicate", json=body)).status_code == 401
            for role in (U, R):
                r = await client.post("/api/mesh/replicate", json=body, headers=bearer(keys[role]))
                assert r.status_code == 403
            assert rep.asked == []  # refused before the replicator heard of it
            admin = bearer(keys[A])
            for bad in ([1], {"model": "Bad Name!", "copies": 1}, {"model": "m", "copies": 65},
                        {"model": "m", "copies": True}, {"model": "m", "copies": 1, "labels": ["\ud800"]},
                        {"model": "m", "copies": 1, "labels": ["a b"]}, {"model": "m", "copies": 1, "labels": "gpu"}):
                raw = json.dumps(bad).encode()  # ASCII escapes: a lone surrogate arrives as \\ud800
                r = await client.post("/api/mesh/replicate", content=raw,
                                      headers={**admin, "content-type": "application/json"})
                assert r.status_code == 400 and "error" in r.json(), bad
            assert rep.asked == []
            r = await client.post("/api/mesh/replicate", json={**body, "labels": ["gpu"]}, headers=admin)
            assert r.status_code == 200 and rep.asked == [("m:1b", 3, ("gpu",))]
            # Reading the mesh's models is a read: any key (here a gateway without a model service).
            gw.app.extensions["meshollama"].models = None
            assert (await client.get("/api/mesh/models", headers=bearer(keys[R]))).status_code == 200
    assert not peer_may_call("POST", "/api/mesh/replicate")  # never served to a peer


async def test_a_closed_mesh_node_that_is_not_admin_refuses_to_set_copy_counts(tmp_path):
    rep = Replicator()
    mesh = FakeMesh()
    mesh.admission = SimpleNamespace(known_role=lambda peer: "serve")
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.app.extensions["meshollama"].models = SimpleNamespace(replicator=rep)
            r = await client.post("/api/mesh/replicate", json={"model": "m", "copies": 2})
    assert r.status_code == 409 and "admin" in r.json()["error"] and rep.asked == []


async def test_a_gateway_without_a_model_service_lists_the_same_rows():
    """A pure gateway (no store, no replicator) answers /api/mesh/models in the shape
    ``meshollama models`` and the panel read: one row per model with its holders."""
    from .fakes import model

    mesh = FakeMesh("peer-self")
    mesh.add("peer-a", [model("llama3:latest", digest="sha256:" + "a" * 64)])
    mesh.add("peer-b", [model("Llama3", digest="sha256:" + "a" * 64), model("qwen:7b")])
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            body = (await client.get("/api/mesh/models")).json()
    assert body["store"] is None
    assert [(r["model"], r["copies"], sorted(h["peer"] for h in r["holders"])) for r in body["models"]] == [
        ("llama3:latest", 2, ["peer-a", "peer-b"]), ("qwen:7b", 1, ["peer-b"])]
    assert body["models"][0]["digests"] == {"sha256:" + "a" * 64: 2}
