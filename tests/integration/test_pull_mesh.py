"""Pulls over the mesh with stand-in Ollama stores on disk (real nodes, real libp2p).

Each holder is a stand-in Ollama over a models directory the test wrote and
a real ``meshollama start --backend ollama`` in front of it; the puller's
``/api/pull`` must fetch from them, verify, and leave a model its own Ollama
lists with the same digest, or end with an explicit error and no model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import httpx
import pytest
import trio

from .cluster import cluster
from .modelstores import copy_model, corrupt, ollama_node, write_model

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


async def pull(node, model: str, on_event=None) -> list[dict]:
    events: list[dict] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)) as client:
        async with client.stream("POST", node.api + "/api/pull", json={"model": model}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.strip():
                    events.append(json.loads(line))
                    if on_event is not None and await on_event(events[-1]) is False:
                        break
    return events


def manifest_of(root, model: str):
    base, _, tag = model.partition(":")
    path = root / "manifests" / "registry.ollama.ai" / "library" / base / (tag or "latest")
    return path.read_bytes() if path.exists() else None


async def wait_holders(c, node, model: str, n: int) -> None:
    async def enough() -> bool:
        view = await c.view(node)
        return sum(1 for p in view.values() if any(m["name"] == model for m in p.get("models", []))) >= n

    await c.wait_until(enough)


def sources(events: list[dict], digest: str) -> dict[str, int]:
    last = [e for e in events if e.get("digest") == digest and "meshollama" in e]
    return last[-1]["meshollama"]["from"] if last else {}


async def test_multi_source_pull_from_three_peers_then_ollama_lists_the_same_digest(tmp_path):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            rate = {"MESHOLLAMA_MODELS_SERVE_RATE": str(8 * MIB)}  # long enough for all three to take part
            first = write_model(tmp_path / "a-models", "tiny:1b", 40 * MIB)
            holders = []
            for name in ("a", "b", "c"):
                if name != "a":
                    copy_model(tmp_path / "a-models", tmp_path / f"{name}-models", first)
                node, _ = await ollama_node(c, nursery, name, tmp_path / f"{name}-models",
                                            bootstrap=holders[0] if holders else None, **rate)
                holders.append(node)
            puller, fake = await ollama_node(c, nursery, "p", tmp_path / "p-models", bootstrap=holders[0])
            await wait_holders(c, puller, "tiny:1b", 3)

            events = await pull(puller, "tiny:1b")
            statuses = [e.get("status") for e in events]
            assert statuses[0] == "pulling manifest" and statuses[-1] == "success", events[-3:]
            by_peer = sources(events, first.model_layer.digest)
            assert set(by_peer) == {h.peer_id for h in holders}, by_peer
            assert sum(by_peer.values()) == first.model_layer.size
            assert manifest_of(tmp_path / "p-models", "tiny:1b") == manifest_of(tmp_path / "a-models", "tiny:1b")
            async with httpx.AsyncClient() as client:  # the stand-in runs in this process: async
                tags = (await client.get(fake.url + "/api/tags")).json()["models"]
            assert [m["digest"] for m in tags if m["name"] == "tiny:1b"] == [first.manifest_digest]
            assert not any((tmp_path / "p-models" / ".meshollama" / "partial").iterdir())
            nursery.cancel_scope.cancel()


async def test_a_holder_killed_mid_transfer_and_one_serving_corrupt_bytes(tmp_path):
    """Holder ``bad`` gives an honest piece list, then serves corrupt bytes (its
    blob is damaged after it hashed it, mtime kept, as bit rot would); holder
    ``a`` is killed a third of the way. Every corrupt piece is refused, ``bad``
    contributes nothing, and the model arrives whole from ``b``."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            rate = {"MESHOLLAMA_MODELS_SERVE_RATE": str(6 * MIB)}
            first = write_model(tmp_path / "a-models", "tiny:1b", 48 * MIB)
            for name in ("b", "bad"):
                copy_model(tmp_path / "a-models", tmp_path / f"{name}-models", first)
            a, _ = await ollama_node(c, nursery, "a", tmp_path / "a-models", **rate)
            b, _ = await ollama_node(c, nursery, "b", tmp_path / "b-models", bootstrap=a, **rate)
            bad, _ = await ollama_node(c, nursery, "bad", tmp_path / "bad-models", bootstrap=a, **rate)
            puller, _ = await ollama_node(c, nursery, "p", tmp_path / "p-models", bootstrap=a)
            await wait_holders(c, puller, "tiny:1b", 3)
            killed, damaged = [], []
            bad_blob = tmp_path / "bad-models" / "blobs" / first.model_layer.digest.replace(":", "-")

            async def damage_then_kill(event: dict) -> None:
                if event.get("digest") != first.model_layer.digest:
                    return
                if not damaged:  # the piece lists were fetched before the first progress line
                    damaged.append(True)
                    stat = bad_blob.stat()
                    for piece in range(6):
                        corrupt(tmp_path / "bad-models", first.model_layer, piece * 8 * MIB + 7 * MIB)
                    os.utime(bad_blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
                if not killed and event.get("completed", 0) > first.model_layer.size // 3:
                    killed.append(a)
                    c.signal(a, signal.SIGKILL)

            events = await pull(puller, "tiny:1b", damage_then_kill)
            assert killed, "the pull ended before a third"
            assert events[-1] == {"status": "success"}, events[-3:]
            assert manifest_of(tmp_path / "p-models", "tiny:1b") == manifest_of(tmp_path / "a-models", "tiny:1b")
            blob = tmp_path / "p-models" / "blobs" / first.model_layer.digest.replace(":", "-")
            assert blob.read_bytes() == first.model_bytes
            assert sources(events, first.model_layer.digest).get(bad.peer_id, 0) == 0
            assert "sent a corrupt piece" in puller.log(), puller.log()[-3000:]
            await c.wait_exit(a)
            nursery.cancel_scope.cancel()


async def test_a_holder_whose_disk_is_corrupt_is_outvoted(tmp_path):
    """Its piece list hashes its corrupt bytes: the two honest holders' list
    wins, it is never asked for the piece it disagrees on, the model is whole."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            first = write_model(tmp_path / "a-models", "tiny:1b", 24 * MIB)
            for name in ("b", "bad"):
                copy_model(tmp_path / "a-models", tmp_path / f"{name}-models", first)
            corrupt(tmp_path / "bad-models", first.model_layer, 8 * MIB + 3)  # piece 1
            a, _ = await ollama_node(c, nursery, "a", tmp_path / "a-models")
            await ollama_node(c, nursery, "b", tmp_path / "b-models", bootstrap=a)
            await ollama_node(c, nursery, "bad", tmp_path / "bad-models", bootstrap=a)
            puller, _ = await ollama_node(c, nursery, "p", tmp_path / "p-models", bootstrap=a)
            await wait_holders(c, puller, "tiny:1b", 3)
            events = await pull(puller, "tiny:1b")
            assert events[-1] == {"status": "success"}, events[-3:]
            blob = tmp_path / "p-models" / "blobs" / first.model_layer.digest.replace(":", "-")
            assert blob.read_bytes() == first.model_bytes
            nursery.cancel_scope.cancel()


async def test_an_interrupted_pull_resumes_where_it_stopped(tmp_path):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            first = write_model(tmp_path / "a-models", "tiny:1b", 40 * MIB)
            a, _ = await ollama_node(c, nursery, "a", tmp_path / "a-models",
                                     MESHOLLAMA_MODELS_SERVE_RATE=str(8 * MIB))
            puller, _ = await ollama_node(c, nursery, "p", tmp_path / "p-models", bootstrap=a)
            await wait_holders(c, puller, "tiny:1b", 1)

            async def stop_at_half(event: dict):
                if event.get("digest") == first.model_layer.digest and event.get("completed", 0) >= 20 * MIB:
                    return False  # the client goes away: the node cancels the pull

            await pull(puller, "tiny:1b", stop_at_half)
            state = tmp_path / "p-models" / ".meshollama" / "partial" / (
                first.model_layer.digest.replace(":", "-") + ".json")
            async def saved() -> bool:  # the node saves the state when the cancelled pull stops
                return state.exists() and len(json.loads(state.read_text())["done"]) >= 2

            await c.wait_until(saved)
            assert manifest_of(tmp_path / "p-models", "tiny:1b") is None  # nothing visible yet

            events = await pull(puller, "tiny:1b")
            model_events = [e for e in events if e.get("digest") == first.model_layer.digest]
            assert model_events[0]["completed"] >= 16 * MIB, model_events[:2]  # picked up, not restarted
            assert events[-1] == {"status": "success"}
            assert "resuming" in puller.log()
            nursery.cancel_scope.cancel()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root and mount for a tmpfs")
async def test_a_full_disk_ends_the_pull_with_an_error_and_no_model(tmp_path):
    small = tmp_path / "p-models"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
                write_model(tmp_path / "a-models", "tiny:1b", 24 * MIB)
                a, _ = await ollama_node(c, nursery, "a", tmp_path / "a-models")
                puller, _ = await ollama_node(c, nursery, "p", small, bootstrap=a)
                await wait_holders(c, puller, "tiny:1b", 1)
                events = await pull(puller, "tiny:1b")
                assert "no space left on device" in events[-1].get("error", ""), events[-2:]
                assert manifest_of(small, "tiny:1b") is None
                async with httpx.AsyncClient() as client:  # non-streamed: a 500 with the error
                    r = await client.post(puller.api + "/api/pull", json={"model": "tiny:1b", "stream": False})
                assert r.status_code == 500 and "no space left" in r.json()["error"]
                nursery.cancel_scope.cancel()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_replication_converges_to_n_copies_and_heals_after_a_holder_is_removed(tmp_path):
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            write_model(tmp_path / "n0-models", "tiny:1b", 2 * MIB)
            env = {"MESHOLLAMA_MODELS_REPLICA_GRACE": "1", "MESHOLLAMA_MODELS_MIN_FREE_BYTES": "0"}
            nodes = []
            for i in range(5):
                node, _ = await ollama_node(c, nursery, f"n{i}", tmp_path / f"n{i}-models",
                                            bootstrap=nodes[0] if nodes else None, **env)
                nodes.append(node)
            await wait_holders(c, nodes[-1], "tiny:1b", 1)

            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.post(nodes[4].api + "/api/mesh/replicate", json={"model": "tiny:1b", "copies": 3})
                assert r.status_code == 200, r.text

                async def holders() -> list[str]:
                    data = (await client.get(nodes[1].api + "/api/mesh/models")).json()
                    row = next((m for m in data["models"] if m["model"] == "tiny:1b"), None)
                    return [h["peer"] for h in row["holders"] if h["state"] == "alive"] if row else []

                async def exactly(n: int) -> bool:
                    return len(await holders()) == n

                await c.wait_until(lambda: exactly(3))
                with trio.move_on_after(3):  # nobody makes a fourth copy
                    await c.wait_until(lambda: exactly(4))
                assert len(await holders()) == 3
                data = (await client.get(nodes[2].api + "/api/mesh/models")).json()
                row = next(m for m in data["models"] if m["model"] == "tiny:1b")
                assert row["copies_target"] == 3

                now_holding = await holders()
                victim = next(n for n in nodes if n.peer_id in now_holding and n is not nodes[1])
                c.signal(victim, signal.SIGKILL)
                await c.wait_exit(victim)

                async def healed() -> bool:
                    alive = await holders()
                    return len(alive) == 3 and victim.peer_id not in alive

                await c.wait_until(healed)
            nursery.cancel_scope.cancel()


async def test_a_model_no_heartbeat_carries_is_found_through_dht_provider_records(tmp_path):
    """A holder with more models than one heartbeat carries (announce.MAX_MODELS):
    the ones left out are still found, through the DHT's provider records."""
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery, cluster(tmp_path) as c:
            for i in range(280):
                write_model(tmp_path / "a-models", f"m{i:03d}:1b", 1024)
            a, _ = await ollama_node(c, nursery, "a", tmp_path / "a-models")
            puller, fake = await ollama_node(c, nursery, "p", tmp_path / "p-models", bootstrap=a)

            async def heard() -> set[str]:
                return {m["name"] for m in (await c.view(puller)).get(a.peer_id, {}).get("models", [])}

            async def a_announced() -> bool:
                return len(await heard()) >= 200

            await c.wait_until(a_announced)
            hidden = sorted({f"m{i:03d}:1b" for i in range(280)} - await heard())
            assert hidden, "every model fit in the heartbeat"
            assert (await c.view(puller))[a.peer_id]["more_models"] is True  # it says so: the DHT has the rest

            async def a_provided_the_hidden() -> bool:  # paced (mesh.providing.Pace); the left-out ones first
                status = (await c.client.get(a.api + "/api/mesh/status")).json()["mesh"]
                return (status["dht_models"] or {}).get("provided", 0) >= len(hidden)

            await c.wait_until(a_provided_the_hidden)
            async with httpx.AsyncClient(timeout=30) as client:
                # A chat for a model no heartbeat lists goes to the holder the DHT names, by its own word.
                r = await client.post(puller.api + "/api/chat", json={
                    "model": hidden[1], "messages": [{"role": "user", "content": "hi"}], "stream": False})
                assert r.status_code == 200 and r.headers["x-meshollama-peer"] == a.peer_id, r.text
                status = (await client.get(puller.api + "/api/mesh/status")).json()["mesh"]
                assert status["holder_lookups"].get("found", 0) >= 1, status
                r = await client.post(puller.api + "/api/chat", json={"model": "nobody-has:1b", "messages": []})
                assert r.status_code == 404 and r.json() == {"error": "model 'nobody-has:1b' not found"}
            async with httpx.AsyncClient(timeout=30) as client:
                r = await client.post(puller.api + "/api/pull", json={"model": hidden[0], "stream": False})
                assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
                tags = (await client.get(fake.url + "/api/tags")).json()["models"]
            assert hidden[0] in [m["name"] for m in tags]
            # From a's store over the mesh (not the stand-in's own registry pull): the same manifest on disk.
            assert manifest_of(tmp_path / "p-models", hidden[0]) == manifest_of(tmp_path / "a-models", hidden[0])
            assert "pulling " + hidden[0] in puller.log()
            nursery.cancel_scope.cancel()
