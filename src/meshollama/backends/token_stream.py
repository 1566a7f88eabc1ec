"""Generated text from a llama.cpp worker thread to an HTTP body, bounded.

The worker thread calls :meth:`TokenPipe.put` with each text delta; the trio
side reads them with :func:`collect` (a whole, non-streamed answer) or through
a :class:`StreamBody` (one shaped chunk per delta). At most ``size`` deltas
wait unread, so a slow client slows the model instead of filling memory, and
closing the pipe makes the thread's next ``put`` fail so generation stops.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

import trio

from ..errors import RequestError, UpstreamBroken, UpstreamUnavailable
from ..httpmsg import ProxyResponse
from .ollama_api import Endpoint, Reply, error_reply
from .shapers import Shaper


log = logging.getLogger(__name__)


class TokenPipe:
    """Deltas from the worker thread to trio, bounded, without a round trip per token.

    ``trio.from_thread.run(send.send, ...)`` would make the model thread wait
    for the trio loop to wake up on every token (about 0.5 ms each on a busy
    2-core machine, a few percent of generation time). Instead the thread
    takes one of ``size`` credits and queues the delivery with
    ``run_sync_soon`` (FIFO, and ahead of the thread's own result); the
    reader returns the credit. So at most ``size`` deltas wait unread: a slow
    client still slows the model down rather than filling memory.
    """

    def __init__(self, size: int) -> None:
        self._send, self._recv = trio.open_memory_channel[tuple[str, Any]](size + 2)
        self._credits = threading.Semaphore(size)
        self._token = trio.lowlevel.current_trio_token()
        self._closed = threading.Event()

    # worker thread
    def put(self, text: Any) -> None:
        """Queue a delta; blocks while ``size`` are unread; BrokenResourceError once the reader left."""
        self._credits.acquire()
        if self._closed.is_set():
            self._credits.release()  # wake any other waiter too
            raise trio.BrokenResourceError("the response was closed")
        self._token.run_sync_soon(self._deliver, ("text", text))

    # trio thread
    def _deliver(self, item: tuple[str, Any]) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            pass  # the reader left; run_sync_soon callbacks must not raise

    def finish(self, item: tuple[str, Any]) -> None:
        """The last item ("done" or "error"), then end of stream."""
        self._deliver(item)
        self._send.close()

    async def get(self) -> tuple[str, Any]:
        item = await self._recv.receive()
        self._credits.release()
        return item

    def close(self) -> None:
        """The reader leaves: the thread's next ``put`` fails instead of blocking."""
        self._closed.set()
        self._recv.close()
        self._credits.release()




async def collect(pipe: TokenPipe, shaper: Shaper, ep: Endpoint) -> Reply:
    """Non-streamed answers: run to the end first, so errors keep their status code."""
    while True:
        try:
            kind, payload = await pipe.get()
        except trio.EndOfChannel:
            raise UpstreamUnavailable("generation ended before it finished") from None
        if kind == "text":
            shaper.delta(payload, time.time_ns())
        elif kind == "done":
            return Reply(200, shaper.content_type, shaper.finish(payload, time.time_ns()))
        else:
            return error_reply(RequestError(payload, 500), ep)


class StreamBody:
    """The streamed HTTP body: one chunk per shaped delta, as it arrives."""

    def __init__(self, pipe: TokenPipe, shaper: Shaper) -> None:
        self._pipe = pipe
        self._shaper = shaper
        self._finished = False

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._finished:
            try:
                kind, payload = await self._pipe.get()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._finished = True
                raise UpstreamBroken("generation ended before it finished") from None
            now = time.time_ns()
            if kind == "text":
                chunk = self._shaper.delta(payload, now)
                if chunk:
                    return chunk
            elif kind == "done":
                self._finished = True
                return self._shaper.finish(payload, now)
            else:
                self._finished = True
                return self._shaper.fail(payload, now)
        raise StopAsyncIteration


async def drive(inst: Any, prep: Any, pipe: TokenPipe, cancel: threading.Event, t0: int, load_ns: int) -> None:
    """Run ``inst.generate`` in a worker thread, then hand ("done", stats) or
    ("error", message) to the reader."""
    try:
        stats = await trio.to_thread.run_sync(inst.generate, prep, pipe.put, cancel)
    except trio.BrokenResourceError:
        pipe.finish(("error", "the response was closed"))  # nobody reads it any more
    except Exception as e:
        log.exception("embedded: generation failed")
        pipe.finish(("error", f"llama runner failed: {e}"))
    else:
        pipe.finish(("done", replace(stats, total_ns=time.perf_counter_ns() - t0, load_ns=max(1, load_ns))))


class Once:
    """An async iterator over one bytes object (nothing for an empty body)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> Once:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, b""
        if not data:
            raise StopAsyncIteration
        return data


def reply_response(reply: Reply, *, head: bool = False) -> ProxyResponse:
    """A complete :class:`Reply` as a response (no body for HEAD)."""
    return ProxyResponse(reply.status, (("content-type", reply.content_type),), Once(b"" if head else reply.body))
