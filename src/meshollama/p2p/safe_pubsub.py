"""Our pubsub: py-libp2p 0.8.1's ``Pubsub`` with three of its edges undone.

* **Junk kills the host.** ``Pubsub.stream_handler`` catches libp2p's
  ``ParseError`` but not protobuf's ``DecodeError`` (nor anything else): 8 junk
  bytes from any peer took the host down. Ours drops that stream and reports it.
* **A late stream grafts nobody.** A peer's subscriptions can come before our
  stream to it is up; gossipsub's graft-on-subscribe then found no gossipsub
  peer and the edge waited for a heartbeat (5 s). Ours offers the graft again
  once the stream is up.
* **A stream left on a closed connection.** py-libp2p keeps a peer whose closed
  connection leaves another open, and with it our stream to that peer, even
  when the stream ran on the closed one: every later message to the peer went
  into a dead stream until a write failed, and that message was lost with it.
  A hole-punched pair whose relay went away was deaf one way for a refresh or
  more (``tests/multihost/test_nat.py``: 4 of 10 runs). When the stock code
  would bury such a peer (a failed write, the swarm's ``disconnected``), ours
  opens a new stream on the live connection instead, and keeps the peer's
  subscriptions (they came on its own stream, which it does not resend) and the
  router's state. Writes and buryings go only through the stream registered
  now, so a retired stream's late failure cannot bury its successor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger("meshollama.p2p")


def make_safe_pubsub_class(on_junk: Callable[[str, BaseException], None]):
    """The ``Pubsub`` subclass a host runs (the module's docstring)."""
    from libp2p.network.stream.exceptions import StreamClosed, StreamReset
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.utils import encode_varint_prefixed

    class SafePubsub(Pubsub):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._opening: dict = {}  # peer -> set when the open under way for it ends
            self._moved: set = set()  # peers moved off a closed connection, not registered again yet

        async def _handle_new_peer(self, peer_id) -> None:
            # One open per peer at a time: a later one waits for the first, then opens
            # again only if that did not register the peer (the stock code skips it).
            while (busy := self._opening.get(peer_id)) is not None:
                await busy.wait()
            done = self._opening[peer_id] = trio.Event()
            try:
                await super()._handle_new_peer(peer_id)
            finally:
                del self._opening[peer_id]
                done.set()
            if peer_id in self.peers:
                self._moved.discard(peer_id)
            graft = getattr(self.router, "on_peer_subscribed", None)
            if graft is not None and peer_id in self.peers:
                for topic, peers in list(self.peer_topics.items()):
                    if peer_id in peers:
                        await graft(peer_id, topic)

        # --- a stream on a closed connection ------------------------------------------

        def connection_closed(self, conn) -> None:
            """The swarm's ``disconnected`` for one connection of a peer."""
            if getattr(conn.muxed_conn, "is_closed", True):  # not a duplicate wrapper of a live one
                self._move_off_closed(conn.muxed_conn.peer_id)

        def _handle_dead_peer(self, peer_id) -> None:
            if self._move_off_closed(peer_id):
                return
            super()._handle_dead_peer(peer_id)
            if peer_id in self._moved and peer_id not in self.peers and not self._peer_is_connected(peer_id):
                # Moved, then gone before its new stream came: the stock code, finding
                # it unregistered, leaves it in the router (in the mesh, counted to D).
                self._moved.discard(peer_id)
                self.router.remove_peer(peer_id)

        def _move_off_closed(self, peer_id) -> bool:
            """If our stream to ``peer_id`` runs on a closed connection while another
            is open, open a new one there; everything else stays. True if so."""
            stream = self.peers.get(peer_id)
            muxed = getattr(stream, "muxed_conn", None)
            manager = getattr(self, "manager", None)
            if (muxed is None or not getattr(muxed, "is_closed", False) or not self._peer_is_connected(peer_id)
                    or manager is None or not manager.is_running):
                return False
            log.debug("pubsub stream to %s ran on a closed connection: reopening", peer_id)
            del self.peers[peer_id]
            queue = self.peer_queues.pop(peer_id, None)
            if queue is not None:
                queue.close()  # its sending task ends
            self._replayed_recent_topics.pop(peer_id, None)  # the new stream may replay
            self._moved.add(peer_id)
            manager.run_task(self._reopen_stream, peer_id)
            return True

        async def _reopen_stream(self, peer_id) -> None:
            try:
                await self._handle_new_peer(peer_id)
            except Exception as exc:  # noqa: BLE001 - handled below
                log.debug("reopening the pubsub stream to %s failed: %r", peer_id, exc)
            if peer_id in self.peers:
                return
            if self._peer_is_connected(peer_id):
                self._schedule_peer_stream_retry(peer_id)
            else:  # gone meanwhile: what the stock code does for a dead peer
                self._moved.discard(peer_id)
                self._forget_all_subscriptions(peer_id)
                self.router.remove_peer(peer_id)

        async def write_msg(self, stream, rpc_msg) -> bool:
            peer_id = stream.muxed_conn.peer_id
            if self.peers.get(peer_id) is not stream:
                return False  # retired: only the stream registered now writes
            try:
                await stream.write(encode_varint_prefixed(rpc_msg.SerializeToString()))
                return True
            except (StreamClosed, StreamReset):
                if self.peers.get(peer_id) is stream:
                    self._handle_dead_peer(peer_id)
                return False

        async def handle_sending_messages(self, peer_id, stream, queue) -> None:
            try:
                while (rpc := await queue.pop()) is not None:
                    if not await self.write_msg(stream, rpc):
                        return
            except Exception:  # noqa: BLE001 - as the stock loop, for the current stream only
                log.debug("sending loop for %s ended with an error", peer_id)
                if self.peers.get(peer_id) is stream:
                    self._handle_dead_peer(peer_id)

        # --- junk -----------------------------------------------------------------------

        async def stream_handler(self, stream) -> None:  # type: ignore[override]
            peer_id = stream.muxed_conn.peer_id
            try:
                await super().stream_handler(stream)
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - any junk must not kill the host
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                log.debug("dropping bad pubsub stream from %s: %r", peer_id, exc)
                on_junk(str(peer_id), exc)
                with trio.move_on_after(1.0) as scope:
                    scope.shield = True
                    try:
                        await stream.reset()
                    except Exception:
                        pass

    return SafePubsub
