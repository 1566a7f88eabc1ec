"""The mesh service against hostile announcements: addresses that are not the
announcer's own are dropped and counted, and never dialled (real libp2p on loopback)."""

from __future__ import annotations

import dataclasses
import functools

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.limits import InboundLimiter
from meshollama.mesh import announce
from meshollama.mesh.service import MeshService, MeshSettings
from meshollama.p2p.httpstream import HttpStreamServer
from tests.p2p.helpers import running_hosts, settings

OTHER = "12D3KooWRfTWzgkxKoiAghszinDXpHZrbL4mu5drV8XaHFCHmG3A"


def _service(**host_settings) -> MeshService:
    return MeshService(
        create_new_key_pair(),
        settings(**host_settings),
        MeshSettings(heartbeat_interval=0.2, liveness_interval=0.5),
        models=lambda: (ModelInfo(name="a:latest"),),
        load=lambda: LoadInfo(),
        changed=trio.Event,
        local_upstream=None,
        http_server_factory=lambda on_reject, on_error: HttpStreamServer(
            None, InboundLimiter(4, 4), max_request_bytes=1024, on_reject=on_reject, on_error=on_error),
    )


async def test_foreign_and_garbage_addresses_are_dropped_counted_and_never_dialled():
    dialled: list[str] = []

    async def trap(stream):  # a listener on an address the attacker claims for someone else
        dialled.append("connection")
        await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, trap, 0, host="127.0.0.1"))
            trap_port = listeners[0].socket.getsockname()[1]
            mesh = _service()
            addrs = await nursery.start(mesh.serve)
            async with running_hosts(settings(), settings()) as (middle, attacker):
                # The attacker is heard through a middle peer, so the mesh
                # service dials it from what it announced: the trap shows
                # whether any address that is not the attacker's own is tried.
                await middle.connect(addrs)
                await attacker.connect(middle.addrs())
                base = announce.Announcement(
                    peer_id=attacker.peer_id, seq=1, version="0.1.0",
                    models=(ModelInfo(name="evil:latest"),), load=LoadInfo(),
                    addrs=(
                        attacker.addrs()[0],
                        f"/ip4/127.0.0.1/tcp/{trap_port}/p2p/{OTHER}",  # another peer's
                        f"/ip4/127.0.0.1/tcp/{trap_port}",  # no id
                        "/ip4/1.2.3/tcp/1",  # unparseable
                    ),
                )

                async def seen():
                    view = mesh.snapshot().get(attacker.peer_id)
                    return view is not None and mesh.counters.addrs_dropped.get("foreign_or_invalid", 0) >= 3

                while not await seen():
                    await attacker.publish(announce.encode(base))
                    await trio.sleep(0.1)
                assert mesh.snapshot().get(attacker.peer_id).addrs == (attacker.addrs()[0],)
                while attacker.peer_id not in mesh.status()["connected_peers"]:
                    await trio.sleep(0.05)  # dialled the attacker's own address, and nothing else

                # 1,000 addresses: the whole announcement is dropped and counted.
                many = dataclasses.replace(base, seq=2, addrs=tuple(
                    f"/ip4/127.0.0.1/tcp/{1000 + i}/p2p/{attacker.peer_id}" for i in range(1000)))
                data = announce.encode(dataclasses.replace(many, addrs=many.addrs[:1]))  # a valid shape...
                data = data.replace(many.addrs[0].encode(), '","'.join(many.addrs).encode())  # ...stuffed
                before = mesh.counters.dropped.get("malformed", 0)
                while mesh.counters.dropped.get("malformed", 0) == before:
                    await attacker.publish(data)
                    await trio.sleep(0.1)
                # Signed by the attacker, describing somebody else: forged, dropped.
                forged = announce.encode(dataclasses.replace(base, peer_id=OTHER, seq=3))
                while not mesh.counters.dropped.get("signer_mismatch"):
                    await attacker.publish(forged)
                    await trio.sleep(0.1)
                assert mesh.snapshot().get(OTHER) is None
                await trio.sleep(1.0)  # a few heartbeat and dial rounds
                assert dialled == []
            nursery.cancel_scope.cancel()


async def test_a_peer_claiming_relay_service_it_does_not_give_is_set_aside_and_never_advertised():
    """Any peer may set ``"r": true`` in its heartbeat. One that then refuses
    reservations (here: serves no relay protocol at all) gets no circuit
    address into our announcements and is set aside after a few tries, so a
    real relay can have the slot."""
    from meshollama.p2p.relay import RelaySettings

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            mesh = _service(relay=RelaySettings(client="on"))  # reserve without waiting to be behind NAT
            addrs = await nursery.start(mesh.serve)
            async with running_hosts(settings()) as (liar,):
                await liar.connect(addrs)
                claim = announce.encode(announce.Announcement(
                    peer_id=liar.peer_id, seq=1, version="0.1.0", models=(), load=LoadInfo(),
                    addrs=(liar.addrs()[0],), relay=True))
                relay = mesh._host.relay
                while not relay.reserving:  # heard the claim and tried
                    await liar.publish(claim)
                    await trio.sleep(0.1)
                while relay.may_try(liar.peer_id):  # refused GIVE_UP_AFTER times in a row, then set aside
                    assert not any("/p2p-circuit/" in a for a in mesh.addrs), mesh.addrs
                    await trio.sleep(0.1)
                assert relay.reserving == set() and relay.circuit_addrs() == []
                assert not any("/p2p-circuit/" in a for a in mesh.addrs)
            nursery.cancel_scope.cancel()

