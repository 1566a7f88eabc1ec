"""Process-wide workarounds for py-libp2p 0.8.1, each with a test in tests/p2p.

1. ``KadDHT(protocol_prefix=...)`` is ignored: every module of ``kad_dht``
   imports the constant ``PROTOCOL_ID = "/ipfs/kad/1.0.0"`` by value. We
   rebind it in each module so our DHT speaks ``/meshollama/kad/1.0.0`` and
   never mixes records with an IPFS node it happens to meet.
2. ``Pubsub.stream_handler`` catches libp2p's ``ParseError`` but not
   protobuf's ``DecodeError`` (nor anything else), so 8 junk bytes from any
   peer raise out of the handler and take the host down. ``safe_pubsub``
   (its own module now) catches everything on that stream, resets it, and reports it.
3. Yamux sends a WINDOW_UPDATE frame after almost every read (its "partial
   slack" branch grants credit whenever any is owed). Multistream-select
   reads varints a byte at a time, so one request/response exchange cost
   about 13 extra Noise-encrypted frames. :func:`patch_yamux_window_updates`
   restores go-yamux's rule: grant credit only once half the receive window
   is owed (``tests/p2p/test_patches.py`` counts the frames).
4. Noise reads every message as two exact-size socket reads (length, then
   payload): :func:`patch_buffered_tcp_reads` serves them from a 64 KiB
   buffer, halving the ``recv`` calls per request.
5. ``ProviderStore.find_providers`` answers from the local store alone when
   it holds any record for the key, and it stores every provider a lookup
   found for 48 h: after one lookup the network was never asked again for
   that key. :func:`patch_provider_lookup` makes the local check come back
   empty inside :func:`network_lookup` (a context variable: the lookup's own
   tasks inherit it, the swarm's handlers answering other peers do not).
6. Every Yamux connection runs two timers: an RTT ping every 30 s (the RTT
   only tunes receive windows) and a sweep of stale stream bookkeeping every
   30 s. In a mesh of 25 that is 1.6 wake-ups a second per node, plus the
   peers' pings to answer, on otherwise idle connections:
   :func:`patch_yamux_upkeep` spaces the ping to 2 minutes and the sweep to 5
   (the first RTT measurement, 0.5 s after the connection opens, is kept).
7. py-libp2p's own periodic loops (DCUtR's 2 s look for relayed peers to
   hole-punch, gossipsub's heartbeat, Yamux's stale-stream sweep) each wake
   the process on their own phase: :func:`pace_library_loops` makes their
   sleeps :func:`meshollama.pace.tick`, so they wake with our loops.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import contextmanager

import trio

log = logging.getLogger("meshollama.p2p")

DHT_PROTOCOL_ID = "/meshollama/kad/1.0.0"
_DHT_MODULES = (
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
)


def patch_dht_protocol(protocol_id: str = DHT_PROTOCOL_ID) -> None:
    """Make py-libp2p's Kademlia DHT speak ``protocol_id`` (idempotent)."""
    from libp2p.custom_types import TProtocol

    for name in _DHT_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "PROTOCOL_ID"):
            module.PROTOCOL_ID = TProtocol(protocol_id)


_STOCK_YAMUX_METHOD = None
_PATCHED_YAMUX_METHOD = None


def patch_yamux_window_updates() -> None:
    """Batch Yamux window updates the way go-yamux does (idempotent).

    go-yamux's ``sendWindowUpdate`` skips the update while the credit owed is
    under half the window; py-libp2p 0.8.1 also sends one for every partial
    read. Flow control stays correct: the sender still gets its credit back
    before it can run out (half a window, 128 KiB by default, is always owed
    at most), and auto-tuning still doubles the window on a busy stream.
    """
    global _STOCK_YAMUX_METHOD, _PATCHED_YAMUX_METHOD
    if _PATCHED_YAMUX_METHOD is not None:
        return
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    async def auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            owed = self.target_recv_window - (self.recv_window + buffered)
            if owed <= 0:
                return
            # Batch while the sender still has half a window of credit; once it
            # has less, grant what is owed on every read, as the stock code does:
            # py-libp2p's writer gives up after 5 s at zero window, so a slow
            # reader must not hold back credit it has already freed.
            if owed < self._grow_threshold() and self.recv_window >= self._grow_threshold():
                return
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    _STOCK_YAMUX_METHOD = YamuxStream._auto_tune_and_send_window_update
    _PATCHED_YAMUX_METHOD = auto_tune_and_send_window_update
    YamuxStream._auto_tune_and_send_window_update = auto_tune_and_send_window_update


_NETWORK_LOOKUP: contextvars.ContextVar[bool] = contextvars.ContextVar("meshollama_network_lookup", default=False)
_STOCK_GET_PROVIDERS = None


def patch_provider_lookup() -> None:
    """Inside :func:`network_lookup`, the provider store's local check finds nothing (idempotent)."""
    global _STOCK_GET_PROVIDERS
    if _STOCK_GET_PROVIDERS is not None:
        return
    from libp2p.kad_dht.provider_store import ProviderStore

    stock = ProviderStore.get_providers

    def get_providers(self, key: bytes):
        return [] if _NETWORK_LOOKUP.get() else stock(self, key)

    _STOCK_GET_PROVIDERS = stock
    ProviderStore.get_providers = get_providers


@contextmanager
def network_lookup():
    """``find_providers`` in here asks the network even when the local store has records."""
    token = _NETWORK_LOOKUP.set(True)
    try:
        yield
    finally:
        _NETWORK_LOOKUP.reset(token)


YAMUX_RTT_EVERY = 120.0  # not 300: on a quiet connection it is the only regular traffic (idle NAT timeouts: 4 min)
YAMUX_SWEEP_EVERY = 300.0


def patch_yamux_upkeep(rtt_every: float = YAMUX_RTT_EVERY, sweep_every: float = YAMUX_SWEEP_EVERY) -> None:
    """Space out Yamux's per-connection RTT pings and stale-stream sweeps (idempotent).

    Both are module constants read on every round of their loops, so setting
    them is enough (:func:`pace_library_loops` calls this first: its copy of the
    sweeper reads the module's globals as they were). py-libp2p needs neither
    as a keep-alive: the ping's answer is never required (a missing pong only
    leaves the old RTT), and the sweep reclaims the bookkeeping of streams
    closed without their buffers read, which our handlers always read or
    reset. On the wire the ping is the only regular traffic of a quiet
    connection, so it stays under a common idle NAT timeout (4 min).
    """
    from libp2p.stream_muxer.yamux import yamux

    yamux.RTT_MEASURE_INTERVAL = max(yamux.RTT_MEASURE_INTERVAL, rtt_every)
    yamux._STALE_STREAM_SWEEP_INTERVAL = max(yamux._STALE_STREAM_SWEEP_INTERVAL, sweep_every)


class _PacedTrio:
    """``trio`` as one library function sees it: the same module, but ``sleep``
    is :func:`meshollama.pace.tick` (same period, on the shared ticks)."""

    def __init__(self) -> None:
        from .. import pace

        self.sleep = pace.tick

    def __getattr__(self, name: str):
        return getattr(trio, name)


_PACED: list = []


def _paced(func):
    """A copy of ``func`` whose global ``trio`` is :class:`_PacedTrio` (only that function's)."""
    import types

    glb = dict(func.__globals__)
    glb["trio"] = _PacedTrio()
    new = types.FunctionType(func.__code__, glb, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = func.__qualname__, func.__doc__, func.__module__
    new.__wrapped__ = func
    return new


def pace_library_loops() -> None:
    """Put py-libp2p's periodic loops on :mod:`meshollama.pace`'s ticks (idempotent).

    Only functions whose one ``trio.sleep`` is the loop's period are changed:
    ``GossipSub.heartbeat`` (its initial delay and interval) and
    ``Yamux._stale_stream_sweeper``; ``DCUtRProtocol._auto_drive_loop`` (2 s)
    is replaced by :func:`_auto_drive_loop`.
    """
    if _PACED:
        return
    # The paced copies read the module's globals as they are now: its sweep interval first.
    patch_yamux_upkeep()
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from libp2p.stream_muxer.yamux.yamux import Yamux

    for cls, name in ((GossipSub, "heartbeat"), (Yamux, "_stale_stream_sweeper")):
        stock = getattr(cls, name)
        setattr(cls, name, _paced(stock))
        _PACED.append((cls, name, stock))
    _PACED.append((DCUtRProtocol, "_auto_drive_loop", DCUtRProtocol._auto_drive_loop))
    DCUtRProtocol._auto_drive_loop = _auto_drive_loop


def _relayed(conn) -> bool:
    """Whether a connection runs over a relay (``/p2p-circuit`` in its transport
    addresses), remembered on the connection while those addresses are the same
    list: turning two dozen addresses into strings every 2 s was most of what an
    idle node's DCUtR loop cost."""
    try:
        addrs = conn.get_transport_addresses()
    except Exception:  # noqa: BLE001 - as the stock loop: a connection that cannot say is not relayed
        return False
    known = getattr(conn, "_meshollama_relayed", None)
    if known is not None and known[0] is addrs:
        return known[1]
    relayed = bool(addrs) and any("/p2p-circuit" in str(addr) for addr in addrs)
    try:
        conn._meshollama_relayed = (addrs, relayed)
    except Exception:  # noqa: BLE001, S110 - a connection class with __slots__: just do not remember
        pass
    return relayed


async def _auto_drive_loop(self) -> None:
    """py-libp2p 0.8.1's ``DCUtRProtocol._auto_drive_loop`` (hole-punch the relayed
    peers that never initiate), on :mod:`meshollama.pace`'s 2 s ticks and with
    :func:`_relayed` remembered per connection; otherwise the same."""
    from libp2p.relay.circuit_v2 import dcutr

    from .. import pace

    while True:
        await pace.tick(2.0)
        try:
            network = self.host.get_network()
            connections = getattr(network, "connections", {}) or {}
            for peer_id in list(connections.keys()):
                if peer_id == self.host.get_id():
                    continue
                if peer_id in self._in_progress or peer_id in self._direct_connections:
                    continue
                if self._hole_punch_attempts.get(peer_id, 0) >= dcutr.MAX_HOLE_PUNCH_ATTEMPTS:
                    continue
                conns = connections.get(peer_id)
                if not conns:
                    continue
                if not isinstance(conns, list):
                    conns = [conns]
                if not any(_relayed(conn) for conn in conns):
                    continue
                dcutr.logger.debug("Auto-driving hole punch to %s", peer_id)
                await self.initiate_hole_punch(peer_id)
        except trio.Cancelled:
            raise
        except Exception as e:  # noqa: BLE001 - as the stock loop: one bad round must not end it
            dcutr.logger.debug("Auto-drive loop error: %s", e)


READ_CHUNK = 64 * 1024
_STOCK_TCP_READ = None


def patch_buffered_tcp_reads() -> None:
    """Read the TCP socket in large chunks and serve small reads from a buffer (idempotent).

    Noise reads each message as a 2-byte length, then the payload, each a
    ``receive_some(n)`` of exactly that size: two or three ``recv`` system
    calls per message, and several messages that arrived together still
    cost one call each. ``TrioTCPStream.read(n)`` now fills a per-connection
    buffer with up to 64 KiB at a time and hands out at most ``n`` bytes from
    it. Same bytes, same order, same end-of-stream and error behaviour; only
    the number of system calls changes (``tests/p2p/test_patches.py``).
    """
    global _STOCK_TCP_READ
    if _STOCK_TCP_READ is not None:
        return
    from libp2p.io.trio import TrioTCPStream

    stock = TrioTCPStream.read

    async def read(self, n: int | None = None) -> bytes:
        # One reader per connection (Yamux's incoming-data task), as in
        # py-libp2p 0.8.1; buffered bytes are served without the read lock.
        buffered = getattr(self, "_meshollama_buffer", None)
        if buffered:
            if n is None or n >= len(buffered):
                self._meshollama_buffer = b""
                return buffered
            if n == 0:
                return b""
            self._meshollama_buffer = buffered[n:]
            return buffered[:n]
        data = await stock(self, max(n or 0, READ_CHUNK) if n != 0 else 0)
        if n is not None and len(data) > n:
            self._meshollama_buffer = data[n:]
            return data[:n]
        return data

    _STOCK_TCP_READ = stock
    TrioTCPStream.read = read


def gate_inbound_streams(host, exempt: str, allows: Callable[[str], Awaitable[bool]]) -> None:
    """Hold every inbound stream (ours and py-libp2p's own: identify, gossipsub,
    the DHT, ping, relay) until ``allows(peer_id)`` answers, and reset it if the
    answer is no; streams on ``exempt`` (the admission exchange) pass at once.

    py-libp2p has no connection gater, but every inbound stream goes through
    ``host.multiselect.negotiate`` to find its handler: wrapping the handler it
    returns gates handlers registered later (pubsub, the DHT) too. The protocol
    name is negotiated before the gate, so a stranger learns which protocols we
    speak and nothing else.
    """
    mux = host.multiselect
    negotiate = mux.negotiate

    async def gated_negotiate(communicator, *args, **kwargs):
        protocol, handler = await negotiate(communicator, *args, **kwargs)
        if handler is None or protocol == exempt:
            return protocol, handler

        async def gated(net_stream) -> None:
            peer = net_stream.muxed_conn.peer_id.to_base58()
            if await allows(peer):
                await handler(net_stream)
            else:
                log.debug("stream %s from %s refused: peer not admitted", protocol, peer)
                try:
                    await net_stream.reset()
                except Exception:
                    pass

        return protocol, gated

    mux.negotiate = gated_negotiate
