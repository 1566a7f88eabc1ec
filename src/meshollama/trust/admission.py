"""Admission on every connection: the certificate exchange and the stream gate.

Right after the Noise handshake each side opens ``/meshollama/trust/1`` and
the two exchange, as length-prefixed JSON::

    initiator -> {"cert": <its certificate or "">, "pv": <its policy version>}
    responder -> {"cert": ..., "pv": ..., "policy": <token, if newer than pv>}
                 or {"error": "..."} when the initiator is not admitted
    initiator -> {"policy": <token, if newer than the responder's>} or {}

Each side decides about the other from what it was shown and from its own
policy (see :mod:`.state`). Until that decision every other inbound stream
of the peer waits at the gate (:meth:`Admission.allows`, wired into the
host's protocol negotiation), so a peer that is not admitted is never served
anything: not a request, not a heartbeat, not a DHT query, not a relay slot.
A refused peer is disconnected at once (``on_refused``) and remembered for a
while, so a stranger redialling in a loop costs one handshake per minute.

A newer policy (from an exchange, or posted by ``meshollama admit/revoke``)
is applied, then pushed to every admitted peer by running the exchange with
each: it floods the mesh one round trip per hop, and a node that was offline
gets it in the exchange of its next connection. Applying it re-checks every
admitted peer: one it revokes is refused and cut off everywhere within seconds.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..errors import P2PError, TrustError
from .documents import MAX_POLICY_BYTES, Policy
from .state import TrustState

log = logging.getLogger("meshollama.trust")
audit = logging.getLogger("meshollama.audit")

PROTOCOL = "/meshollama/trust/1"
MAX_MESSAGE = MAX_POLICY_BYTES + 16 * 1024  # a reply or last message may carry the policy
MAX_FIRST = 8 * 1024  # the opening message carries a certificate only: a stranger sends at most this
REFUSED_FOR = 60.0  # seconds a refused peer's new connections are closed without an exchange
RECHECK_EVERY = 5.0  # seconds between checks for expired certificates

Opener = Callable[..., Awaitable]  # (peer_id, protocol, *, timeout) -> Stream


@dataclass
class _Decision:
    event: trio.Event = field(default_factory=trio.Event)
    role: str | None = None
    reason: str = ""

    @property
    def decided(self) -> bool:
        return self.event.is_set()


async def _send(stream, obj: dict) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    await stream.write(struct.pack(">I", len(data)) + data)


async def _receive(stream, timeout: float, limit: int = MAX_MESSAGE) -> dict:
    """One message; anything the peer can send wrong ends as TrustError (or a
    P2PError from the stream), never as another exception: these bytes come
    from a peer nobody has vouched for yet."""
    buf = b""
    with trio.fail_after(timeout):
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            if len(buf) >= 4 and struct.unpack(">I", buf[:4])[0] > limit:
                raise TrustError("admission message too large")
            chunk = await stream.read(min(65536, limit + 4 - len(buf)) or 1, timeout=timeout)
            if not chunk:
                raise TrustError("admission stream ended early")
            buf += chunk
    size = struct.unpack(">I", buf[:4])[0]
    try:
        obj = json.loads(buf[4:4 + size])
    except Exception:  # ValueError, UnicodeDecodeError, RecursionError (b"[" * 200000)
        raise TrustError("admission message is not JSON") from None
    if not isinstance(obj, dict):
        raise TrustError("admission message is not an object")
    return obj


def _text(obj: dict, key: str) -> str:
    v = obj.get(key, "")
    return v if isinstance(v, str) else ""


def _version(obj: dict) -> int:
    v = obj.get("pv", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class Admission:
    """Per-peer admission decisions for one node of a closed mesh."""

    def __init__(self, state: TrustState, *, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.timeout = timeout
        self._clock = clock  # wall clock: certificates carry unix times
        self._decisions: dict[str, _Decision] = {}
        self.generation = 0  # bumped whenever role() may answer differently for some peer
        self._refused_at: dict[str, float] = {}  # peer -> trio time of the last refusal
        self._open: Opener | None = None
        self._nursery: trio.Nursery | None = None
        self._connected: Callable[[], set[str]] = set
        self._answering: set[str] = set()  # peers with an inbound exchange in progress
        # Set by the mesh service: cut a refused peer off, and take a new policy in.
        self.on_refused: Callable[[str, str], None] = lambda peer, why: None
        self.on_admitted: Callable[[str, str], None] = lambda peer, role: None
        self.on_policy: Callable[[Policy], None] = lambda policy: None

    # --- wiring (the host calls these) -------------------------------------------------

    def attach(self, open_stream: Opener, nursery: trio.Nursery, connected: Callable[[], set[str]]) -> None:
        self._open, self._nursery, self._connected = open_stream, nursery, connected
        for peer in connected():  # connections that came up before we could start exchanges
            self.connected(peer)

    def detach(self) -> None:
        self._open = self._nursery = None
        self._decisions.clear()
        self.generation += 1

    def connected(self, peer: str) -> None:
        """A connection to ``peer`` is up: start the exchange (a refused peer is cut at once)."""
        if self._recently_refused(peer):
            self.on_refused(peer, "refused recently")
            return
        self._decisions.setdefault(peer, _Decision())
        if self._nursery is not None:
            self._nursery.start_soon(self._exchange_quietly, peer)

    def disconnected(self, peer: str) -> None:
        """The last connection to ``peer`` closed: its next connection is checked anew."""
        d = self._decisions.pop(peer, None)
        if d is not None and not d.decided:
            d.event.set()  # waiters see "not admitted"
        elif d is not None:
            self.generation += 1

    # --- the gate ------------------------------------------------------------------------

    def role(self, peer: str) -> str | None:
        """The role of a connected peer we admitted, else None (pending or refused)."""
        d = self._decisions.get(peer)
        return d.role if d is not None and d.decided else None

    def known_role(self, peer: str) -> str | None:
        """The role the documents give ``peer`` now, connected or not (for relayed heartbeats)."""
        return self.state.role_of(peer, self._clock())

    async def wait(self, peer: str, timeout: float | None = None) -> str | None:
        """The peer's role once decided; None if refused or undecided after ``timeout``."""
        if self._recently_refused(peer):
            return None
        d = self._decisions.setdefault(peer, _Decision())
        with trio.move_on_after(self.timeout if timeout is None else timeout):
            await d.event.wait()
        return d.role if d.decided else None

    async def allows(self, peer: str) -> bool:
        """Whether an inbound stream of ``peer`` may be served (waits for the decision)."""
        return await self.wait(peer) is not None

    def _recently_refused(self, peer: str) -> bool:
        at = self._refused_at.get(peer)
        return at is not None and trio.current_time() - at < REFUSED_FOR

    def _decide(self, peer: str, role: str | None, reason: str, *, remember: bool = True) -> None:
        d = self._decisions.setdefault(peer, _Decision())
        if d.decided and d.role == role:
            return
        was = d.role if d.decided else None
        if d.decided:  # a change of mind (a policy): a fresh decision object for new waiters
            d = self._decisions[peer] = _Decision()
        d.role, d.reason = role, reason
        d.event.set()
        self.generation += 1
        if role is None:
            if remember:
                self._refused_at[peer] = trio.current_time()
            if len(self._refused_at) > 4096:
                self._refused_at.pop(next(iter(self._refused_at)))
            log.warning("peer %s not admitted: %s", peer, reason)
            if was is not None:
                audit.info("peer %s (%s) cut off: %s", peer, was, reason)
            self.on_refused(peer, reason)
        else:
            self._refused_at.pop(peer, None)
            if was != role:
                log.info("peer %s admitted as %s", peer, role)
                self.on_admitted(peer, role)

    # --- the exchange ----------------------------------------------------------------------

    async def handle(self, stream) -> None:
        """Responder side; ``stream`` is our :class:`~meshollama.p2p.stream.Stream`."""
        peer = stream.peer_id
        now = self._clock()
        if peer in self._answering:  # one exchange per peer at a time: no stream flood
            await stream.reset()
            return
        self._answering.add(peer)
        try:
            first = await _receive(stream, self.timeout, MAX_FIRST)
            self.state.check_presented(peer, _text(first, "cert"), now)
            role = self.state.role_of(peer, now)
            if role is None:
                await _send(stream, {"error": "not admitted to this mesh: ask its operator to run "
                                              f"`meshollama admit {peer}`"})
                await stream.close()
                self._decide(peer, None, "no valid certificate")
                return
            theirs = _version(first)
            reply = {"cert": self.state.own_token(now), "pv": self.state.policy.version}
            if self.state.policy.version > theirs and self.state.policy.token:
                reply["policy"] = self.state.policy.token
            await _send(stream, reply)
            self._decide(peer, role, "certificate")
            last = await _receive(stream, self.timeout)
            if _text(last, "policy"):
                self.offer_policy(_text(last, "policy"), source=peer)
            await stream.close()
        except (TrustError, P2PError, trio.TooSlowError) as exc:
            log.debug("admission exchange from %s failed: %r", peer, exc)
            await stream.reset()
        finally:
            self._answering.discard(peer)

    async def exchange(self, peer: str) -> str | None:
        """Initiator side: show our certificate, learn the peer's; returns its role."""
        if self._open is None:
            raise P2PError("host not running")
        now = self._clock()
        stream = await self._open(peer, PROTOCOL, timeout=self.timeout)
        try:
            mine = self.state.policy.version
            await _send(stream, {"cert": self.state.own_token(now), "pv": mine})
            reply = await _receive(stream, self.timeout)
            if "error" in reply:
                await stream.close()
                log.error("peer %s does not admit this node: %s", peer, _text(reply, "error")[:200])
                # Not a verdict on the peer (our certificate may be on its way): no memory of it.
                self._decide(peer, None, "it does not admit us", remember=False)
                return None
            self.state.check_presented(peer, _text(reply, "cert"), self._clock())
            role = self.state.role_of(peer, self._clock())
            if role is not None and _text(reply, "policy"):  # policies from admitted peers only
                self.offer_policy(_text(reply, "policy"), source=peer)
                role = self.state.role_of(peer, self._clock())
            push = role is not None and self.state.policy.version > _version(reply) and self.state.policy.token
            await _send(stream, {"policy": self.state.policy.token} if push else {})
            await stream.close()
        except BaseException:
            await stream.reset()
            raise
        self._decide(peer, role, "certificate" if role else "no valid certificate")
        return role

    async def _exchange_quietly(self, peer: str) -> None:
        """Run the exchange; whatever the peer does, the node goes on. A failure that
        is not a verdict (two nodes dialling each other at once close one of the two
        connections, and the exchange on it fails) is retried once while the peer is
        still connected and undecided (its own exchange may decide it meanwhile)."""
        for attempt in (1, 2):
            try:
                await self.exchange(peer)
                return
            except Exception as exc:
                if not isinstance(exc, (TrustError, P2PError, trio.TooSlowError)):
                    log.warning("admission exchange with %s failed: %r", peer, exc)
                failure = exc
            if attempt == 1:
                await trio.sleep(0.5)
            if peer not in self._connected() or self._decisions.get(peer, _Decision()).decided:
                return
        # A failed exchange is no verdict (the link may be bad): cut, but let the
        # next connection try again.
        self._decide(peer, None, f"no admission exchange: {failure}", remember=False)

    # --- policy ---------------------------------------------------------------------------

    def offer_policy(self, token: str, *, source: str = "local") -> bool:
        """Apply ``token`` if it is a newer valid policy; then re-check every peer and
        push it on. Raises TrustError for a policy that does not verify."""
        if not self.state.offer_policy(token, self._clock()):
            return False
        audit.info("policy version %d from %s", self.state.policy.version, source)
        self._refused_at.clear()  # whoever we refused may be admitted now: let them try again
        self.on_policy(self.state.policy)
        self.recheck()
        if self._nursery is not None:
            for peer in list(self._decisions):
                if peer != source and self.role(peer) is not None:
                    self._nursery.start_soon(self._exchange_quietly, peer)
        return True

    def recheck(self) -> None:
        """Re-decide every admitted peer against the documents now (revocation, expiry);
        cut again a refused peer that is somehow still connected (a disconnect that
        timed out), so refusal never depends on one attempt succeeding."""
        now = self._clock()
        connected = self._connected()
        for peer in list(self._decisions):
            d = self._decisions.get(peer)
            if d is None or not d.decided:
                continue
            if d.role is None:
                if peer in connected:
                    self.on_refused(peer, d.reason)
                continue
            role = self.state.role_of(peer, now)
            if role != d.role:
                self._decide(peer, role, "revoked or expired" if role is None else "role changed")

    async def recheck_loop(self) -> None:
        while True:
            await trio.sleep(RECHECK_EVERY)
            self.recheck()
