"""Bootstrap from a node's API URL (mesh/bootstrap_url.py, mesh/loops.py).

The /healthz answer is a stranger's claim: only addresses ending in the
claimed id are kept, the URL's own host is dialled first, junk is an error
(never a crash), and the loop re-asks at every attempt."""

from __future__ import annotations

import json

import pytest
import trio

from meshollama.config import ConfigError, load_config
from meshollama.errors import P2PError
from meshollama.mesh import bootstrap_url
from tests.unit.test_mesh_service import BOOT as LOOP_BOOT, EPS, run_mesh

BOOT = "12D3KooWBhJ8qTZ9r5V7xYzE4aBcDeFgHjKmNpQrStUvWxYz1234"
OTHER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"


def health(peer_id=BOOT, addrs=None) -> bytes:
    addrs = addrs if addrs is not None else [f"/ip4/10.1.2.3/tcp/4001/p2p/{peer_id}"]
    return json.dumps({"status": "ok", "peer_id": peer_id, "p2p_addrs": addrs}).encode()


def answering(status: int, body: bytes):
    asked = []

    async def get(url):
        asked.append(url)
        return status, body

    get.asked = asked
    return get


async def no_dns(host, port, **kw):
    raise OSError("no such host")


@pytest.mark.parametrize("text", ["http://node1:11434", "https://10.0.0.1:8443/", "http://[fd00::1]:11434"])
def test_api_urls_are_accepted_as_bootstrap_entries(text):
    cfg = load_config(None, {}, {"p2p.bootstrap": [text]})
    assert cfg.p2p.bootstrap == (text.rstrip("/"),)


@pytest.mark.parametrize("text", ["http://user:secret@node1:11434", "http://node1:11434/api/tags",
                                  "http://node1:11434/?x=1", "http://:11434", "http://node1:70000",
                                  "http://[fe80::1%25eth0]:11434"])
def test_unusable_urls_are_refused_with_the_reason(text):
    with pytest.raises(ConfigError):
        load_config(None, {}, {"p2p.bootstrap": [text]})


async def test_the_urls_own_host_is_dialled_first_then_the_announced_addresses():
    get = answering(200, health(addrs=[f"/ip4/10.1.2.3/tcp/4001/p2p/{BOOT}", "/ip4/10.1.2.4/tcp/4002"]))
    peer, dial = await bootstrap_url.resolve("http://198.18.0.7:11434", get=get)
    assert get.asked == ["http://198.18.0.7:11434/healthz"]
    assert peer == BOOT
    assert dial == [f"/ip4/198.18.0.7/tcp/4001/p2p/{BOOT}", f"/ip4/198.18.0.7/tcp/4002/p2p/{BOOT}",
                    f"/ip4/10.1.2.3/tcp/4001/p2p/{BOOT}", f"/ip4/10.1.2.4/tcp/4002/p2p/{BOOT}"]


async def test_a_name_is_resolved_by_this_machine():
    async def dns(host, port, **kw):
        assert host == "node1"
        return [(2, 1, 6, "", ("198.18.0.9", 0)), (2, 1, 6, "", ("198.18.0.9", 0))]

    _, dial = await bootstrap_url.resolve("http://node1:11434", get=answering(200, health()), getaddrinfo=dns)
    assert dial[0] == f"/ip4/198.18.0.9/tcp/4001/p2p/{BOOT}" and len(dial) == 2


async def test_addresses_of_another_peer_or_wildcards_in_the_answer_are_dropped():
    body = health(addrs=[f"/ip4/10.1.2.3/tcp/4001/p2p/{OTHER}", f"/ip4/0.0.0.0/tcp/4001/p2p/{BOOT}",
                         "not a multiaddr", 7, f"/ip4/10.9.9.9/tcp/4009/p2p/{BOOT}"])
    _, dial = await bootstrap_url.resolve("http://node1:11434", get=answering(200, body), getaddrinfo=no_dns)
    assert dial == [f"/ip4/10.9.9.9/tcp/4009/p2p/{BOOT}"]


@pytest.mark.parametrize("status, body, says", [
    (200, b"<html>hello</html>", "did not answer JSON"),
    (200, b'["x"]', "no valid peer_id"),
    (200, json.dumps({"peer_id": "../../etc", "p2p_addrs": []}).encode(), "no valid peer_id"),
    (200, health(addrs=[f"/ip4/10.1.2.3/tcp/4001/p2p/{OTHER}"]), "announces no TCP address"),
    (503, b"{}", "answered 503"),
    (200, b"[" * 60000, "did not answer JSON"),  # a RecursionError inside json, within the size cap
])
async def test_junk_answers_are_errors_that_say_what_was_wrong(status, body, says):
    with pytest.raises(P2PError, match=says):
        await bootstrap_url.resolve("http://node1:11434", get=answering(status, body), getaddrinfo=no_dns)


async def test_a_silent_server_times_out(autojump_clock):
    async def hangs(url):
        await trio.sleep_forever()

    with pytest.raises(P2PError, match="TooSlowError"):
        await bootstrap_url.resolve("http://node1:11434", get=hangs, getaddrinfo=no_dns, timeout=5)


async def test_the_loop_asks_the_url_at_every_attempt_and_dials_what_it_says(autojump_clock, monkeypatch):
    answers = [P2PError("connection refused"), (LOOP_BOOT, [f"/ip4/10.0.0.9/tcp/4001/p2p/{LOOP_BOOT}"])]
    asked = []

    async def resolve(url):
        asked.append(trio.current_time())
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(bootstrap_url, "resolve", resolve)
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, seed=7, bootstrap=("http://node1:11434",), heartbeat_interval=2.0)
        r.net.reachable.add(LOOP_BOOT)
        await r.at(1.0)
        assert len(asked) == 2  # refused at once, asked again after the back-off
        assert LOOP_BOOT in r.net.host.connected_peers()
        r.net.host.peer_disconnects(LOOP_BOOT)
        await r.at(5.0 + EPS)
        assert len(asked) == 3  # lost: asked again (a rebuilt pod may have a new id)
        nursery.cancel_scope.cancel()


async def test_a_url_that_leads_to_this_node_is_not_dialled(autojump_clock, monkeypatch):
    async with trio.open_nursery() as nursery:
        calls, started = [], trio.Event()
        box = []

        async def resolve(url):
            calls.append(url)
            await started.wait()  # the loop may ask before run_mesh returns
            own = box[0].mesh.self_id
            return own, [f"/ip4/10.0.0.9/tcp/4001/p2p/{own}"]

        monkeypatch.setattr(bootstrap_url, "resolve", resolve)
        r = await run_mesh(nursery, bootstrap=("http://meshollama-0.meshollama:11434",))
        box.append(r)
        started.set()
        await r.at(30.0)
        # Asked again only every bootstrap_retry_max (a load-balanced name may lead elsewhere later).
        assert calls and set(calls) == {"http://meshollama-0.meshollama:11434"} and len(calls) <= 2
        assert not r.net.host.dials
        assert r.mesh.status()["bootstrap_self"] == ["http://meshollama-0.meshollama:11434"]  # /readyz waits for no one
        nursery.cancel_scope.cancel()


async def _serve_once(headers: bytes, body: bytes, task_status=trio.TASK_STATUS_IGNORED):
    """A one-answer HTTP server on 127.0.0.1 (port chosen by the OS)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    conn = await listeners[0].accept()
    async with conn:
        await conn.receive_some(65536)
        await conn.send_all(b"HTTP/1.1 200 OK\r\n" + headers + b"content-length: %d\r\n\r\n" % len(body) + body)
        with trio.move_on_after(5):
            await conn.receive_some(1)
    await listeners[0].aclose()


async def test_a_compressed_answer_is_refused_before_it_is_expanded():
    import gzip

    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces in about 64 KiB
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_serve_once, b"content-type: application/json\r\ncontent-encoding: gzip\r\n", bomb)
            with pytest.raises(P2PError, match="compressed answer refused"):
                await bootstrap_url.resolve(f"http://127.0.0.1:{port}")


async def test_a_real_healthz_answer_over_http():
    body = health()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_serve_once, b"content-type: application/json\r\n", body)
            peer, dial = await bootstrap_url.resolve(f"http://127.0.0.1:{port}")
    assert peer == BOOT and dial[0] == f"/ip4/127.0.0.1/tcp/4001/p2p/{BOOT}"


async def test_a_crashing_resolve_is_retried_not_fatal(autojump_clock, monkeypatch):
    asked = []

    async def resolve(url):
        asked.append(trio.current_time())
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(bootstrap_url, "resolve", resolve)
    async with trio.open_nursery() as nursery:
        r = await run_mesh(nursery, seed=7, bootstrap=("http://node1:11434",), heartbeat_interval=2.0)
        await r.at(5.0)
        assert len(asked) >= 3 and r.mesh.status()["host"] == "running" and r.mesh.counters.host_restarts == 0
        nursery.cancel_scope.cancel()
