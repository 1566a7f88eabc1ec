"""Fetch one blob from the peers that hold it: several at once, piece-verified, resumable.

The :class:`~.plan.BlobPlan` decides which piece goes to which peer; this
module does the I/O around it:

* **Piece lists.** Every holder is asked for its piece hashes (``pieces``),
  a few at a time; a holder that cannot answer may still serve pieces, which
  are checked against the list the others agree on.
* **Workers.** ``depth`` requests in flight per holder, each a ``get`` of one
  piece on its own stream, buffered in memory (one piece, 8 MiB) and hashed as
  it arrives; only a piece whose hash matches is written, with ``pwrite`` at
  its offset in ``<partial_dir>/sha256-<hex>``. A holder that stops sending
  for ``p2p.stream_timeout`` or trickles below :data:`MIN_RATE` fails that
  piece; one that fails :data:`~.plan.MAX_FAILURES` times in a row, or sends a
  bad piece once, gets no more work for this blob.
* **Resume.** ``sha256-<hex>.json`` beside the data lists the pieces written;
  it is saved every second and when the fetch stops for any reason. A later
  pull of the same blob re-hashes those pieces and fetches only the rest.
* **Verify.** When every piece is in, the whole file's sha256 must be the
  blob's digest (Ollama's "verifying sha256 digest"); if it is not, the piece
  list was a lie (:meth:`~.plan.BlobPlan.reject_hashes`) and the pieces it
  got wrong are fetched again. Only then is the file committed to the store.

Disk space is claimed up front (``posix_fallocate``), so a full disk fails
the pull at once with ``no space left on device``, not halfway.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import trio

from ..errors import P2PError
from .blob_client import BlobError, get_pieces, get_range
from .manifest import Layer, blob_filename
from .plan import BlobPlan, Request
from .store import Store
from .wire import PIECE_SIZE

log = logging.getLogger("meshollama.models")

DEPTH = 2  # pieces in flight per holder
MIN_RATE = 256 * 1024  # bytes/s below which a piece is given up (a trickling holder)
PIECE_GRACE = 15.0  # seconds added to every piece's deadline
LIST_TIMEOUT = 60.0  # plus LIST_RATE: a holder hashes the whole blob for its first piece list
LIST_RATE = 100 * 1000 * 1000  # bytes/s of hashing a holder is given (a SATA SSD's read rate)
LIST_TRIES = 30  # a holder answering "busy" to a piece-list request is asked again, 1 s apart
NO_PROGRESS = 300.0  # seconds without a verified byte before a blob's fetch gives up
SAVE_EVERY = 1.0
HASH_CHUNK = 4 * 1024 * 1024


class PullError(Exception):
    """Ends a pull with ``{"error": message}``."""


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [x for sub in exc.exceptions for x in _leaves(sub)]
    return [exc]


def leaf(exc: BaseException) -> BaseException:
    """The error inside nested groups (trio wraps what leaves a nursery): the only
    one that is not a cancellation, or the first when all are the same kind (two
    workers hitting one full disk); else the group itself."""
    leaves = _leaves(exc)
    real = [x for x in leaves if not isinstance(x, trio.Cancelled)] or leaves
    if len(real) == 1 or len({type(x) for x in real}) == 1:
        return real[0]
    return exc


@contextmanager
def one_error():
    """Re-raise a nursery's lone error as itself, so callers catch PullError, OSError, ClientGone."""
    try:
        yield
    except BaseExceptionGroup as group:
        single = leaf(group)
        if isinstance(single, BaseExceptionGroup):
            raise
        raise single from None


class Sources(Protocol):
    """Where blobs come from (the mesh, in :mod:`.sources`)."""

    async def open(self, peer_id: str): ...  # a blob-protocol Stream

    def label(self, peer_id: str) -> str: ...


Progress = Callable[[int, dict[str, int]], Awaitable[None]]  # completed bytes, bytes by peer


def _cancelled() -> bool:
    """Whether we are unwinding because of a cancellation (keep the partial blob to resume)."""
    exc = sys.exc_info()[1]
    return exc is not None and isinstance(leaf(exc), trio.Cancelled)


def _no_space(exc: OSError, root: Path) -> PullError:
    return PullError(f"no space left on device: not enough room in {root} ({exc.strerror})")


class BlobFetch:
    def __init__(self, store: Store, layer: Layer, sources: Sources, *, piece_size: int = PIECE_SIZE,
                 depth: int = DEPTH) -> None:
        self.store = store
        self.layer = layer
        self.sources = sources
        self.plan = BlobPlan(layer.digest, layer.size, piece_size=piece_size, depth=depth)
        directory = store.partial_dir()
        self.data_path = directory / blob_filename(layer.digest)
        self.state_path = directory / (blob_filename(layer.digest) + ".json")
        self._written: set[int] = set()
        self._changed = trio.Event()
        self._fd = -1

    # --- the whole fetch ----------------------------------------------------------------------

    async def run(self, peers: Sequence[str], progress: Progress,
                  more_peers: Callable[[], Sequence[str]] = lambda: ()) -> None:
        """Fetch, verify and commit the blob, or raise :class:`PullError`."""
        with one_error():
            await self._ask_lists(peers)
        if self.plan.count and self.plan.hashes is None:
            raise PullError(f"cannot fetch {self.layer.digest}: {self.plan.stuck() or 'no holder could list it'}")
        await trio.to_thread.run_sync(self._open_file)
        failed = True
        try:
            await self._resume()
            while True:
                with one_error():
                    await self._fetch(progress, more_peers)
                await progress(self.plan.completed_bytes, self._by_peer())
                if await trio.to_thread.run_sync(self._whole_digest) == self.layer.digest:
                    break
                log.warning("blob %s failed its digest: the piece list it was checked against was wrong",
                            self.layer.digest[:19])
                self._written &= self.plan.done if self.plan.reject_hashes() else set()
                if self.plan.hashes is None:
                    raise PullError(f"digest mismatch for {self.layer.digest}: every holder sent bad data")
            self._save_state()
            failed = False
        finally:
            if self._fd >= 0:
                self._save_state()
                os.close(self._fd)
                self._fd = -1
            if failed and not self._written and not _cancelled():
                # Nothing verified to resume from: give the claimed space back.
                self.data_path.unlink(missing_ok=True)
                self.state_path.unlink(missing_ok=True)
        await trio.to_thread.run_sync(self._commit)

    async def _ask_lists(self, peers: Sequence[str]) -> None:
        if self.plan.count <= 1:
            for peer in peers:
                self.plan.add_peer(peer)
            return
        limiter = trio.CapacityLimiter(4)

        async def ask(peer: str) -> None:
            async with limiter:
                hashes: list[bytes] | None = None
                for attempt in range(LIST_TRIES):
                    try:
                        with trio.fail_after(LIST_TIMEOUT + self.layer.size / LIST_RATE):
                            size, hashes = await get_pieces(await self.sources.open(peer), self.layer.digest)
                        if size != self.layer.size:
                            self.plan.drop(peer, f"has a blob of {size} bytes, the manifest says {self.layer.size}")
                            return
                        break
                    except (P2PError, trio.TooSlowError) as exc:
                        busy = isinstance(exc, BlobError) and exc.code == "busy"
                        if busy and attempt + 1 < LIST_TRIES:
                            await trio.sleep(1.0)
                            continue
                        log.info("%s could not list the pieces of %s: %s", self.sources.label(peer),
                                 self.layer.digest[:19], exc or "timed out")
                        break
                self.plan.add_peer(peer, hashes)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)

    async def _fetch(self, progress: Progress, more_peers: Callable[[], Sequence[str]]) -> None:
        """Run workers until every piece is in; new holders join when all others are spent."""
        while not self.plan.finished:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report, progress)
                async with trio.open_nursery() as workers:
                    for peer in self.plan.usable():
                        for _ in range(self.plan.depth):
                            workers.start_soon(self._worker, peer)
                nursery.cancel_scope.cancel()
            if self.plan.finished:
                return
            if self.plan.unservable() and self.plan.live_alternative() and self.plan.reject_hashes():
                self._written &= self.plan.done
                # The list we chose is held only by holders now gone (a 1-1 tie lost to a
                # corrupt or vanished one): the live holders' list is the one to follow.
                log.warning("blob %s: the piece list in use has no live holder left: switching lists",
                            self.layer.digest[:19])
                continue
            fresh = [p for p in more_peers() if p not in self.plan.peers]
            if not fresh:
                raise PullError(f"cannot fetch {self.layer.digest}: {self.plan.stuck() or 'no holder left'}")
            await self._ask_lists(fresh)

    async def _worker(self, peer: str) -> None:
        plan = self.plan
        while not plan.finished and peer in plan.usable():
            request = plan.next_request(peer, trio.current_time())
            if request is None:
                if plan.stuck() is not None or not plan.in_flight() and not self._paused(peer):
                    return  # nothing this peer may fetch is left, or will come back
                changed = self._changed
                with trio.move_on_after(0.5):
                    await changed.wait()
                continue
            await self._one_piece(peer, request)
            self._notify()

    def _paused(self, peer: str) -> bool:
        state = self.plan.peers[peer]
        return not state.dropped and state.paused_until > trio.current_time()

    async def _one_piece(self, peer: str, request: Request) -> None:
        plan = self.plan
        buf = bytearray()
        hasher = hashlib.sha256()

        def sink(chunk: bytes) -> None:
            if len(buf) + len(chunk) > request.length:
                raise BlobError("bad_answer", f"{peer} sent more than the {request.length} bytes asked")
            buf.extend(chunk)
            hasher.update(chunk)

        deadline = PIECE_GRACE + request.length / MIN_RATE
        try:
            with trio.fail_after(deadline):
                await get_range(await self.sources.open(peer), self.layer.digest, request.offset,
                                request.length, sink)
            if len(buf) != request.length:
                raise BlobError("bad_answer", f"short piece: {len(buf)} of {request.length} bytes")
        except trio.Cancelled:
            plan.cancelled(peer, request.index)
            raise
        except (P2PError, trio.TooSlowError) as exc:
            why = f"piece {request.index} too slow" if isinstance(exc, trio.TooSlowError) else str(exc)
            busy = isinstance(exc, BlobError) and exc.code == "busy"
            log.info("blob %s piece %d from %s failed: %s", self.layer.digest[:19], request.index,
                     self.sources.label(peer), why)
            plan.failed(peer, request.index, busy=busy, now=trio.current_time(), why=why)
            return
        was_usable = peer in plan.usable()
        if plan.received(peer, request.index, hasher.digest()):
            await trio.to_thread.run_sync(self._write, request, buf)
            self._written.add(request.index)
        elif was_usable and peer not in plan.usable():
            log.warning("%s sent a corrupt piece of %s: dropped from this pull", self.sources.label(peer),
                        self.layer.digest[:19])

    async def _report(self, progress: Progress) -> None:
        last, saved = -1, trio.current_time()
        moved = trio.current_time()
        while True:
            done = self.plan.completed_bytes
            if done != last:
                last, moved = done, trio.current_time()
                await progress(done, self._by_peer())
            elif trio.current_time() - moved > NO_PROGRESS:
                raise PullError(f"no verified byte of {self.layer.digest} for {NO_PROGRESS:.0f} s "
                                f"({len(self.plan.usable())} holder(s) left, all busy or stalled)")
            if trio.current_time() - saved >= SAVE_EVERY:
                saved = trio.current_time()
                await trio.to_thread.run_sync(self._save_state)
            await trio.sleep(0.2)

    def _by_peer(self) -> dict[str, int]:
        return {p: s.received for p, s in self.plan.peers.items() if s.received}

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- disk ---------------------------------------------------------------------------------

    def _open_file(self) -> None:
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(self._fd).st_size != self.layer.size:
                os.ftruncate(self._fd, self.layer.size)
            if self.layer.size:
                os.posix_fallocate(self._fd, 0, self.layer.size)
        except OSError as exc:
            os.close(self._fd)
            self._fd = -1
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.data_path.unlink(missing_ok=True)  # give the space back
                self.state_path.unlink(missing_ok=True)
                raise _no_space(exc, self.store.root) from None
            raise

    async def _resume(self) -> None:
        """Pieces a previous pull wrote, kept only if they still hash right."""
        claimed = await trio.to_thread.run_sync(self._load_state)
        chosen = self.plan.hashes
        if not claimed or chosen is None:
            return
        good = await trio.to_thread.run_sync(self._verify_pieces, claimed, chosen)
        self.plan.done |= good
        self._written |= good
        if good:
            log.info("resuming %s: %d of %d pieces already here", self.layer.digest[:19], len(good),
                     self.plan.count)

    def _load_state(self) -> set[int]:
        try:
            state = json.loads(self.state_path.read_text())
            if state.get("size") == self.layer.size and state.get("piece") == self.plan.piece_size:
                return {int(i) for i in state.get("done", []) if 0 <= int(i) < self.plan.count}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return set()

    def _save_state(self) -> None:
        state = {"digest": self.layer.digest, "size": self.layer.size, "piece": self.plan.piece_size,
                 "done": sorted(self._written)}
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_path)
        except OSError as exc:  # a full disk: the data stays, a later pull re-hashes it all
            log.warning("cannot save pull state for %s: %s", self.layer.digest[:19], exc)

    def _verify_pieces(self, claimed: set[int], chosen: tuple[bytes, ...]) -> set[int]:
        good = set()
        for index in sorted(claimed):
            piece = self.plan.piece(index)
            if hashlib.sha256(os.pread(self._fd, piece.length, piece.offset)).digest() == chosen[index]:
                good.add(index)
        return good

    def _write(self, request: Request, data: bytearray) -> None:
        view = memoryview(data)
        offset = request.offset
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(exc, self.store.root) from None
            raise

    def _whole_digest(self) -> str:
        os.fsync(self._fd)
        hasher = hashlib.sha256()
        offset = 0
        while offset < self.layer.size:
            chunk = os.pread(self._fd, min(HASH_CHUNK, self.layer.size - offset), offset)
            if not chunk:
                break
            hasher.update(chunk)
            offset += len(chunk)
        return "sha256:" + hasher.hexdigest()

    def _commit(self) -> None:
        self.store.commit_blob(self.layer.digest, self.data_path)
        self.state_path.unlink(missing_ok=True)
