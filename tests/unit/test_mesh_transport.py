"""An in-memory :class:`~meshollama.mesh.transport.Transport` for the mesh
service's tests (``test_mesh_service``, ``test_mesh_supervision``), and the
check that it and the real ``P2PHost`` both have the shape the service uses.

:class:`FakeNet` is the world: which peers accept a dial, which are frozen,
how the next host starts; its ``factory`` is the service's ``host_factory``
and keeps every :class:`FakeHost` it built, with the time it was built.
Nothing here does I/O, so the tests run under ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.errors import P2PError, StreamReset
from meshollama.mesh import announce
from meshollama.mesh.service import MeshService, MeshSettings
from meshollama.mesh.transport import Transport
from meshollama.p2p.events import Event, EventQueue
from meshollama.p2p.host import HostSettings, Message, P2PHost
from meshollama.p2p.keys import peer_id_of
from meshollama.p2p.ping import PING_PROTOCOL

HOST_SETTINGS = HostSettings(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, dht=False)


class FakeStream:
    """The ping protocol's far end: echoes what is written, unless its peer is frozen."""

    def __init__(self, net: FakeNet, peer_id: str) -> None:
        self.net = net
        self.peer_id = peer_id
        self._pending = b""
        self.done = False

    async def write(self, data: bytes, *, timeout: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.done:
            raise StreamReset("stream already reset")
        self._pending += data

    async def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        if self.peer_id in self.net.frozen:
            await trio.sleep_forever()  # a SIGSTOPped peer: no answer, no error
        if self.peer_id in self.net.slow:
            await trio.sleep(self.net.slow[self.peer_id])  # a starved one: the echo comes late
        await trio.lowlevel.checkpoint()
        out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out

    async def close(self) -> None:
        self.done = True

    async def reset(self) -> None:
        self.done = True


class FakeSyncStream:
    """A peer's ``/meshollama/sync/1`` answer: takes our frame, answers ``net.sync_table``
    (or ``table``: its hello answer); a frozen peer never answers."""

    def __init__(self, net: FakeNet, peer_id: str, table: list[tuple[bytes, int]] | None = None) -> None:
        from meshollama.mesh.sync import frame

        self.net = net
        self.peer_id = peer_id
        self.sent = b""
        table = net.sync_table if table is None else table
        self._answer = b"".join(frame(age_ms.to_bytes(4, "big") + raw) for raw, age_ms in table) + frame(b"")

    async def write(self, data: bytes, *, timeout: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        if self.peer_id in self.net.frozen:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        out, self._answer = self._answer[:max_bytes], self._answer[max_bytes:]
        return out

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        pass


class FakeHost:
    """One host of the fake world; the service sees it through ``Transport``."""

    def __init__(self, net: FakeNet, key_pair, settings: HostSettings, *, on_junk=None, on_addrs_changed=None,
                 admission=None) -> None:
        self.net = net
        self.peer_id = peer_id_of(key_pair)
        self.settings = settings
        self.events = EventQueue()
        self.relay = None
        self.handlers: dict = {}
        self.connected: set[str] = set()
        self.published: list[tuple[float, announce.Announcement]] = []
        self.dials: list[float] = []  # when connect() was called
        self.opened: list[tuple[str, str]] = []  # (peer, protocol) of every open_stream
        self._inbox_send, self._inbox = trio.open_memory_channel[Message | BaseException](math.inf)
        self._crash = trio.Event()
        self._crash_error: BaseException | None = None

    # --- what the test does to it ---------------------------------------------

    def crash(self, error: BaseException | None = None) -> None:
        """Make ``serve`` fail, as libp2p dying under us would."""
        self._crash_error = error or P2PError("fake host died")
        self._crash.set()

    def peer_connects(self, peer_id: str) -> None:
        self.connected.add(peer_id)
        self.events.emit(Event("connected", peer_id))

    def peer_disconnects(self, peer_id: str) -> None:
        self.connected.discard(peer_id)
        self.events.emit(Event("disconnected", peer_id))

    def hear(self, ann: announce.Announcement) -> None:
        """A heartbeat from ``ann.peer_id`` arrives (signed by it)."""
        self._inbox_send.send_nowait(Message(ann.peer_id, announce.encode(ann)))

    def break_receive(self, error: BaseException) -> None:
        """``next_message`` raises ``error`` (a bug in a loop, not in libp2p)."""
        self._inbox_send.send_nowait(error)

    def topic_peers(self) -> int:
        return self.net.topic_peers

    def publish_times(self) -> list[float]:
        return [t for t, _ in self.published]

    # --- Transport ---------------------------------------------------------------

    def set_handler(self, protocol: str, handler) -> None:
        self.handlers[protocol] = handler

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio.lowlevel.checkpoint()
        if self.net.start_errors:
            error = self.net.start_errors.pop(0)
            if error is not None:
                raise error
        task_status.started(self.addrs())
        try:
            await self._crash.wait()
            raise self._crash_error
        finally:
            self.events.close()

    def addrs(self) -> list[str]:
        return [f"/ip4/127.0.0.1/tcp/4001/p2p/{self.peer_id}"]

    def connected_peers(self) -> set[str]:
        return set(self.connected)

    async def connect(self, addrs, *, timeout: float | None = None) -> str:
        self.dials.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        target = list(addrs)[-1].rsplit("/p2p/", 1)[-1]
        if target not in self.net.reachable:
            raise P2PError(f"cannot reach {target}")
        self.peer_connects(target)
        return target

    def known_addrs(self, peer_id: str) -> list[str]:
        return []

    async def open_stream(self, peer_id: str, protocol: str, *, timeout: float | None = None):
        await trio.lowlevel.checkpoint()
        self.opened.append((peer_id, protocol))
        if peer_id not in self.connected:
            raise P2PError(f"not connected to {peer_id}")
        if protocol == "/meshollama/sync/1" and self.net.sync_table is not None:
            return FakeSyncStream(self.net, peer_id)
        if protocol == "/meshollama/hello/1" and peer_id in self.net.hello_of:
            own = self.net.hello_of[peer_id]
            return FakeSyncStream(self.net, peer_id, [(own, 0)] if own else [])
        if protocol != PING_PROTOCOL:
            raise P2PError(f"{peer_id} does not serve {protocol}")
        return FakeStream(self.net, peer_id)

    async def disconnect(self, peer_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.peer_disconnects(peer_id)

    async def publish(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.published.append((trio.current_time(), announce.decode(data)))

    async def next_message(self) -> Message:
        item = await self._inbox.receive()
        if isinstance(item, BaseException):
            raise item
        return item

    async def dht_refresh(self) -> list[tuple[str, tuple[str, ...]]]:
        await trio.lowlevel.checkpoint()
        return []

    def dht_size(self) -> int:
        return 0


class FakeNet:
    def __init__(self) -> None:
        self.reachable: set[str] = set()  # peers that accept a dial
        self.frozen: set[str] = set()  # peers that never answer a ping
        self.slow: dict[str, float] = {}  # peers whose echo comes this many seconds late
        self.start_errors: list[BaseException | None] = []  # how the next hosts start: None = fine
        self.hosts: list[FakeHost] = []
        self.built_at: list[float] = []
        self._changed = trio.Event()
        self.load = LoadInfo(in_flight=0, capacity=2)  # what the backend reports
        self.topic_peers = 1  # gossip neighbours subscribed to the heartbeat topic
        self.models = (ModelInfo(name="a:latest"),)  # what the backend serves
        self.sync_table: list[tuple[bytes, int]] | None = None  # peers' sync answer (signed, age ms); None: unserved
        self.hello_of: dict[str, bytes] = {}  # a peer's hello answer (its signed heartbeat, b"": none yet); absent: unserved

    def factory(self, key_pair, settings, **kw) -> FakeHost:
        host = FakeHost(self, key_pair, settings, **kw)
        self.hosts.append(host)
        self.built_at.append(trio.current_time())
        return host

    @property
    def host(self) -> FakeHost:
        """The latest host built."""
        return self.hosts[-1]

    def changed(self) -> trio.Event:  # the backend's ``changed``
        return self._changed

    def backend_changes(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def make_service(net: FakeNet, *, admission=None, **settings) -> MeshService:
    return MeshService(
        create_new_key_pair(),
        HOST_SETTINGS,
        MeshSettings(**settings),
        models=lambda: net.models,
        load=lambda: net.load,
        changed=net.changed,
        local_upstream=None,
        http_server_factory=lambda on_reject, on_error: SimpleNamespace(handle=None),
        host_factory=net.factory,
        admission=admission,
    )


def heartbeat(peer_id: str, seq: int, *, draining: bool = False, addrs: tuple[str, ...] = (),
              refresh_ms: int = 0) -> announce.Announcement:
    """A peer's announcement; without ``refresh_ms`` an older node's (it beats every interval)."""
    return announce.Announcement(peer_id=peer_id, seq=seq, version="0.1.0", models=(ModelInfo(name="a:latest"),),
                                 load=LoadInfo(in_flight=0, capacity=2), draining=draining, addrs=addrs,
                                 refresh_ms=refresh_ms)


async def test_p2phost_and_the_fake_both_have_what_the_mesh_service_uses():
    real = P2PHost(create_new_key_pair(), HOST_SETTINGS)
    assert isinstance(real, Transport)
    assert isinstance(FakeNet().factory(create_new_key_pair(), HOST_SETTINGS), Transport)


def test_a_host_missing_a_method_is_not_a_transport():
    class Partial:
        events = EventQueue()
        relay = None

        def addrs(self) -> list[str]:
            return []

    assert not isinstance(Partial(), Transport)


async def test_the_service_builds_its_hosts_with_the_factory(autojump_clock):
    net = FakeNet()
    mesh = make_service(net)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(mesh.serve)
            assert len(net.hosts) == 1 and addrs == net.host.addrs()
            assert set(net.host.handlers) == {"/meshollama/http/1.1.0", "/meshollama/sync/1", "/meshollama/load/1",
                                     "/meshollama/holds/1", "/meshollama/hello/1"}
            nursery.cancel_scope.cancel()
