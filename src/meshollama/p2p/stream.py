"""A libp2p stream with a deadline on every operation and one error type.

py-libp2p streams can hang forever (a frozen peer never answers; a Yamux
write that times out waiting for a window update raises without resetting,
leaving the reader hanging). So every operation here has a timeout, and any
failure resets the stream before raising :class:`~meshollama.errors.P2PError`.
"""

from __future__ import annotations

import logging

import trio

from ..errors import P2PError, StreamReset

log = logging.getLogger("meshollama.p2p")


class Stream:
    """Thin wrapper over a libp2p ``INetStream``."""

    def __init__(self, raw, peer_id: str, *, timeout: float) -> None:
        self._raw = raw
        self.peer_id = peer_id
        self.timeout = timeout
        self._done = False

    async def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        """Next bytes from the peer; ``b""`` at a clean end of stream.

        ``timeout=None`` uses the stream default; ``float('inf')`` waits as
        long as it takes (used while a generation is running; the caller is
        then responsible for cancelling on liveness failure).
        """
        from libp2p.network.stream.exceptions import StreamEOF

        limit = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                return await self._raw.read(max_bytes)
        except StreamEOF:
            return b""
        except trio.TooSlowError:
            await self.reset()
            raise P2PError(f"read from {self.peer_id} timed out after {limit:.1f}s") from None
        except trio.Cancelled:
            raise
        except Exception as exc:
            await self.reset()
            raise StreamReset(f"stream from {self.peer_id} failed: {type(exc).__name__}: {exc}") from exc

    async def write(self, data: bytes, *, timeout: float | None = None) -> None:
        limit = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                await self._raw.write(data)
        except trio.TooSlowError:
            await self.reset()
            raise P2PError(f"write to {self.peer_id} timed out after {limit:.1f}s") from None
        except trio.Cancelled:
            raise
        except Exception as exc:
            await self.reset()
            raise StreamReset(f"write to {self.peer_id} failed: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        """Close our side politely; never raises, never blocks long."""
        await self._finish("close")

    async def reset(self) -> None:
        """Abort the stream so the other side stops at once; never raises."""
        await self._finish("reset")

    async def _finish(self, how: str) -> None:
        # Shielded and time-boxed: this runs in finally blocks of cancelled code.
        if self._done:
            return
        self._done = True
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await getattr(self._raw, how)()
            except Exception:
                pass
