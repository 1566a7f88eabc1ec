"""Our own liveness check, because py-libp2p never notices a frozen peer.

A SIGSTOPped peer keeps its TCP connection open: libp2p still lists it as
connected, reads on its streams hang forever and new streams fail only after
a 10 s negotiation timeout. We keep one ``/ipfs/ping/1.0.0`` stream per peer
(py-libp2p's host answers it by default) and send 32 bytes every
``liveness_interval``; no echo within ``liveness_timeout`` means down.
"""

from __future__ import annotations

import os

import trio

from ..errors import P2PError
from .stream import Stream

PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_SIZE = 32


class PingTimeout(P2PError):
    """No echo in time: the peer, or we, may only be slow (``mesh.liveness.LocalHealth``)."""


class Pinger:
    def __init__(self, open_stream, *, timeout: float) -> None:
        self._open_stream = open_stream
        self._timeout = timeout
        self._streams: dict[str, Stream] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._running: dict[str, tuple[trio.CancelScope, float]] = {}  # peer -> (its ping's deadline scope, start)

    def busy(self, peer_id: str) -> bool:
        """True while a ping to this peer is in progress (don't start another)."""
        lock = self._locks.get(peer_id)
        return lock is not None and lock.locked()

    async def ping(self, peer_id: str, *, timeout: float | None = None) -> float:
        """Round-trip time in seconds; raises :class:`PingTimeout` if the peer does not
        answer within ``timeout`` (the Pinger's own by default), P2PError if it fails.

        Pings to one peer are serialised: two interleaved on the kept stream
        would read each other's echo (seen as "bad ping echo" under load).
        """
        lock = self._locks.setdefault(peer_id, trio.Lock())
        async with lock:
            return await self._ping(peer_id, self._timeout if timeout is None else timeout)

    def hurry(self, peer_id: str, timeout: float) -> None:
        """Cut the ping in flight to ``peer_id`` (if any) to ``timeout`` from its start:
        it began with a longer one and someone now waits on the answer."""
        running = self._running.get(peer_id)
        if running is not None:
            scope, start = running
            scope.deadline = min(scope.deadline, start + timeout)

    async def _ping(self, peer_id: str, timeout: float) -> float:
        start = trio.current_time()
        try:
            with trio.fail_after(timeout) as scope:
                self._running[peer_id] = (scope, start)
                stream = self._streams.get(peer_id)
                if stream is None:
                    stream = await self._open_stream(peer_id, PING_PROTOCOL, timeout=timeout)
                    self._streams[peer_id] = stream
                payload = os.urandom(PING_SIZE)
                await stream.write(payload, timeout=timeout)
                echo = b""
                while len(echo) < PING_SIZE:
                    chunk = await stream.read(PING_SIZE - len(echo), timeout=timeout)
                    if not chunk:
                        raise P2PError(f"ping stream to {peer_id} closed")
                    echo += chunk
                if echo != payload:
                    raise P2PError(f"bad ping echo from {peer_id}")
        except (P2PError, trio.TooSlowError) as exc:
            self._running.pop(peer_id, None)
            await self.forget(peer_id)
            if isinstance(exc, trio.TooSlowError):
                waited = trio.current_time() - start
                raise PingTimeout(f"ping to {peer_id} timed out after {waited:.1f}s") from None
            raise
        finally:
            self._running.pop(peer_id, None)
        return trio.current_time() - start

    async def forget(self, peer_id: str) -> None:
        self._locks.pop(peer_id, None) if not self.busy(peer_id) else None
        stream = self._streams.pop(peer_id, None)
        if stream is not None:
            await stream.reset()
