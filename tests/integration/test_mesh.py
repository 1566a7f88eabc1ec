"""The mesh as users run it: separate ``meshollama start`` processes on loopback.

Each node has its own stand-in Ollama (in this test process) serving its own
model, and knows only the first node as bootstrap.
"""

from __future__ import annotations

import signal
from functools import partial

import pytest
import trio

from meshollama.mesh.liveness import IDLE_PING_EVERY
from tests.fakes.fake_ollama import serve_fake

from .cluster import HEARTBEAT, cluster

pytestmark = pytest.mark.slow


async def fakes(nursery, n):
    out = []
    for i in range(n):
        out.append(await nursery.start(partial(serve_fake, [f"model{i}:latest"], name=f"n{i}")))
    return out


def ollama_args(fake):
    return ("--backend", "ollama", "--ollama-url", fake.url)


async def sees(c, node, peer_ids, *, models=None):
    view = await c.view(node)
    for pid in peer_ids:
        if pid not in view or view[pid]["state"] != "alive":
            return False
    if models:
        names = {m["name"] for p in view.values() for m in p.get("models", [])}
        if not set(models) <= names:
            return False
    return True


async def test_five_nodes_converge_from_one_bootstrap(tmp_path):
    with trio.fail_after(90):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fk = await fakes(fn, 5)
            first = await c.start("n0", *ollama_args(fk[0]))
            others = []
            async with trio.open_nursery() as starter:
                for i in range(1, 5):
                    starter.start_soon(partial(_start_into, c, others, f"n{i}", *ollama_args(fk[i]), bootstrap=first))
            nodes = [first, *others]
            ids = [n.peer_id for n in nodes]
            models = [f"model{i}:latest" for i in range(5)]
            # The bound: everyone sees everyone, with models, within 10 s.
            with trio.fail_after(10):
                for node in nodes:
                    await c.wait_until(partial(sees, c, node, ids, models=models))
            # the same via the CLI table and JSON
            fn.cancel_scope.cancel()


async def _start_into(c, out, name, *args, bootstrap):
    out.append(await c.start(name, *args, bootstrap=bootstrap))


async def test_kill_term_restart_and_freeze(tmp_path):
    with trio.fail_after(120):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fk = await fakes(fn, 4)
            a = await c.start("a", *ollama_args(fk[0]))
            b = await c.start("b", *ollama_args(fk[1]), bootstrap=a)
            k = await c.start("k", *ollama_args(fk[2]), bootstrap=a)
            s = await c.start("s", *ollama_args(fk[3]), bootstrap=a)
            everyone = [a.peer_id, b.peer_id, k.peer_id, s.peer_id]
            with trio.fail_after(15):
                for node in (a, b, k, s):
                    await c.wait_until(partial(sees, c, node, everyone))

            # SIGKILL: gone from every table within 3 heartbeat intervals (+ detection slack)
            c.signal(k, signal.SIGKILL)
            await c.wait_exit(k)
            with trio.fail_after(3 * HEARTBEAT + 2.5):
                for node in (a, b, s):
                    await c.wait_until(partial(_not_alive, c, node, k.peer_id), step=0.05)

            # SIGTERM: clean exit 0, and others drop it at once (leave announcement)
            c.signal(s, signal.SIGTERM)
            with trio.fail_after(8):
                assert await c.wait_exit(s) == 0
            with trio.fail_after(HEARTBEAT + 1):
                for node in (a, b):
                    await c.wait_until(partial(_absent, c, node, s.peer_id), step=0.05)

            # restart with the same data dir: same peer id, back in the mesh
            old_id = s.peer_id
            await c.restart(s)
            assert s.peer_id == old_id
            with trio.fail_after(15):
                await c.wait_until(partial(sees, c, a, [s.peer_id]))

            # SIGSTOP: a frozen idle peer sends nothing and keeps its connection; in a mesh
            # this small every idle peer is pinged every 5 rounds (liveness.IDLE_PING_EVERY x 1 s)
            # and a ping times out after 2 s; an idle peer's first miss only makes it suspected
            # and urgent (loops.SUSPECT_MISSES), so the next round's ping (1 s later, 2 s timeout)
            # marks it down: within 10 s, + slack. SIGCONT: back.
            c.signal(b, signal.SIGSTOP)
            try:
                with trio.fail_after(IDLE_PING_EVERY * 1.0 + 2.0 + (1.0 + 2.0) + 3.0):
                    await c.wait_until(partial(_not_alive, c, a, b.peer_id), step=0.05)
            finally:
                c.signal(b, signal.SIGCONT)
            with trio.fail_after(15):
                await c.wait_until(partial(sees, c, a, [b.peer_id]))
            fn.cancel_scope.cancel()


async def _not_alive(c, node, peer_id):
    view = await c.view(node)
    return peer_id not in view or view[peer_id]["state"] != "alive"


async def _absent(c, node, peer_id):
    return peer_id not in await c.view(node)


async def test_wrong_psk_never_appears(tmp_path):
    from meshollama.identity import write_psk

    write_psk(tmp_path / "good.key")
    write_psk(tmp_path / "bad.key")
    with trio.fail_after(60):
        async with cluster(tmp_path) as c:
            a = await c.start("a", "--backend", "none", "--psk-file", str(tmp_path / "good.key"))
            good = await c.start("good", "--backend", "none", "--psk-file", str(tmp_path / "good.key"), bootstrap=a)
            bad = await c.start("bad", "--backend", "none", "--psk-file", str(tmp_path / "bad.key"), bootstrap=a)
            none = await c.start("none", "--backend", "none", bootstrap=a)
            with trio.fail_after(15):
                await c.wait_until(partial(sees, c, a, [good.peer_id]))
            # give the outsiders several heartbeats' worth of bootstrap retries
            for _ in range(int(4 / HEARTBEAT)):
                view = await c.view(a)
                assert bad.peer_id not in view and none.peer_id not in view
                assert a.peer_id not in await c.view(bad)
                await trio.sleep(HEARTBEAT)


async def test_bootstrap_that_starts_later_is_found(tmp_path):
    """A node whose bootstrap peer is not up yet keeps redialling until it is."""
    with trio.fail_after(60):
        async with cluster(tmp_path) as c:
            a = await c.start("a", "--backend", "none")
            addr = a.addr
            c.signal(a, signal.SIGTERM)
            await c.wait_exit(a)
            # b starts while its bootstrap is down; same port reused by a's restart below
            port = addr.split("/tcp/")[1].split("/")[0]
            a.args[a.args.index("/ip4/127.0.0.1/tcp/0")] = f"/ip4/127.0.0.1/tcp/{port}"
            b = await c.start("b", "--backend", "none", bootstrap=a)
            await c.restart(a)
            with trio.fail_after(20):
                await c.wait_until(partial(sees, c, b, [a.peer_id]))
