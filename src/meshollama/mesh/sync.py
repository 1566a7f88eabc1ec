"""Table sync: a node that connects learns the mesh in one round trip (``/meshollama/sync/1``).

Nodes announce rarely now (``mesh.cadence``: an idle node once per 30 s), so
a node that joins would wait that long to hear of everyone. Instead it pulls
the table of the first peer it connects to, the way Serf and Consul do a
push-pull on join: it sends its own latest signed heartbeat, and the peer
answers with the signed heartbeats of every peer it holds up, then its own.
Every one is checked as gossip checks it (``p2p.signed``) and applied like a
gossiped one, so the peer handing them on can replay but never forge.

``/meshollama/hello/1`` is the same exchange answered with the server's own
heartbeat alone. A node that gets a connection from a peer its table does not
hold asks it, rather than wait for that peer's announcement to hop here through
gossip: a connection and gossip are separate paths, and gossip has failed
before (``p2p.gossip``). While 25 nodes start on 2 cores about 65 hellos
teach a node a peer that way; the last pairs of the start are no sooner for
it (connections to the newest node come as late as its gossip).

Wire: length-prefixed frames (4-byte big-endian length, then the bytes).
The caller sends one frame (its own heartbeat, or an empty frame if it has
none yet; the server takes it only if the caller signed it); the server
answers with one frame per heartbeat (4 bytes: milliseconds since it heard
it, then the heartbeat) and an empty frame. The age keeps a heartbeat handed
from node to node from living longer than it would have in any one table.

The server faces strangers: in a closed mesh only admitted peers are
served; a slot (of :data:`SERVE_SLOTS`) is taken before anything is read; a
peer is served at most once per :data:`SERVE_EVERY` seconds (an answer can
be large, a request is small); the request frame is bounded
(``p2p.signed.MAX_SIGNED``) and due within :data:`DEADLINE`. The caller
bounds what it takes the same way: frames, bytes and time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import trio

from ..errors import P2PError
from ..p2p.signed import MAX_SIGNED
from .gate import Gate

PROTOCOL = "/meshollama/sync/1"
# The same exchange, answered with the server's own heartbeat alone: two connected peers
# of which one does not know the other introduce themselves in one round trip (mesh.loops).
HELLO_PROTOCOL = "/meshollama/hello/1"
HELLO_SLOTS = 8  # hellos served at once
HELLO_EVERY = 10.0  # seconds: a peer is answered at most this often
HELLO_IN_FLIGHT = 8  # hellos we make at once: a flood of connections from strangers stays bounded
HELLO_DEADLINE = 3.0  # seconds for a hello's exchange, once its stream is open (one frame each way)
SERVE_SLOTS = 4  # syncs served at once
SERVE_EVERY = 30.0  # seconds: a peer is served at most this often (well above any deadline: no slot hogging)
DEADLINE = 10.0  # seconds for a whole sync, either side
REQUEST_DEADLINE = 2.0  # seconds for the caller's one small frame: an idle stream does not hold a slot
MAX_TOTAL = 32 * 1024 * 1024  # bytes of heartbeats one answer may carry
PULL_EVERY = 60.0  # seconds: a node pulls on a new connection at most this often (mesh.loops)
_LEN = struct.Struct(">I")
_AGE = struct.Struct(">I")  # milliseconds since the server heard the heartbeat
MAX_AGE_MS = 2**32 - 1


def frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


class FrameReader:
    """Reads length-prefixed frames from a ``p2p.stream.Stream``."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = await self.stream.read(max(65536, n - len(self.buf)))
            if not chunk:
                raise P2PError(f"sync with {self.stream.peer_id}: stream ended inside a frame")
            self.buf += chunk

    async def next(self, limit: int) -> bytes:
        """The next frame (``b""`` for the empty one); P2PError if longer than ``limit``."""
        await self._fill(_LEN.size)
        (size,) = _LEN.unpack_from(self.buf)
        if size > limit:
            raise P2PError(f"sync with {self.stream.peer_id}: a {size}-byte frame (limit {limit})")
        await self._fill(_LEN.size + size)
        data = bytes(self.buf[_LEN.size:_LEN.size + size])
        del self.buf[:_LEN.size + size]
        return data


class SyncServer:
    """Answers ``/meshollama/sync/1``: takes the caller's heartbeat, hands ours and our table's."""

    def __init__(self, *, table: Callable[[], Iterable[tuple[bytes, float]]], accept: Callable[[bytes, str], None],
                 allow: Callable[[str], bool] = lambda peer_id: True,
                 on_count: Callable[[str], None] = lambda what: None, slots: int = SERVE_SLOTS,
                 every: float = SERVE_EVERY) -> None:
        self.table = table  # (signed heartbeat, seconds since heard) to hand out, ours included
        self.accept = accept  # (a signed heartbeat the caller sent, the caller): checked there
        self.on_count = on_count
        self.gate = Gate(allow=allow, every=every, slots=slots)

    async def handle(self, stream) -> None:
        peer = stream.peer_id
        refused = self.gate.enter(peer, trio.current_time())
        if refused is not None:
            self.on_count(f"refused_{refused}")
            await stream.reset()
            return
        try:
            with trio.move_on_after(DEADLINE) as scope:
                with trio.fail_after(REQUEST_DEADLINE):
                    theirs = await FrameReader(stream).next(MAX_SIGNED)
                if theirs:
                    self.accept(theirs, peer)
                batch = bytearray()
                for raw, age in self.table():
                    batch += frame(_AGE.pack(min(MAX_AGE_MS, max(0, round(age * 1000)))) + raw)
                    if len(batch) >= 65536:
                        await stream.write(bytes(batch))
                        batch.clear()
                batch += frame(b"")
                await stream.write(bytes(batch))
                await stream.close()
                self.on_count("served")
            if scope.cancelled_caught:
                self.on_count("served_timeout")
                await stream.reset()
        except (P2PError, trio.TooSlowError):
            self.on_count("served_failed")
            await stream.reset()
        finally:
            self.gate.leave()


async def pull(stream, own: bytes, accept: Callable[[bytes, float], None], *, max_frames: int,
               deadline: float = DEADLINE) -> int:
    """Send ``own`` (our latest signed heartbeat, or ``b""``) and feed every heartbeat
    the peer answers to ``accept`` (with its age in seconds); returns how many. P2PError (the stream reset) if
    the answer breaks a bound: more than ``max_frames`` frames or :data:`MAX_TOTAL`
    bytes, or slower than ``deadline``."""
    with trio.move_on_after(deadline):
        try:
            await stream.write(frame(own))
            reader = FrameReader(stream)
            count = total = 0
            while entry := await reader.next(_AGE.size + MAX_SIGNED):
                count += 1
                total += len(entry)
                if count > max_frames or total > MAX_TOTAL:
                    raise P2PError(f"sync with {stream.peer_id}: answer over {max_frames} heartbeats or {MAX_TOTAL} bytes")
                if len(entry) <= _AGE.size:
                    raise P2PError(f"sync with {stream.peer_id}: a frame without a heartbeat")
                (age_ms,) = _AGE.unpack_from(entry)
                accept(entry[_AGE.size:], age_ms / 1000)
                if count % 64 == 0:
                    await trio.sleep(0)  # a large table must not hold up the other loops
            await stream.close()
            return count
        except BaseException:
            # Any way out but the answer (a bound broken, a caller's deadline, a cancel)
            # resets the stream: left open, it would hold a slot of the peer's server.
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await stream.reset()
            raise
    raise P2PError(f"sync with {stream.peer_id} took over {deadline:.0f}s")  # reset on the way out
