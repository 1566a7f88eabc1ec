"""What the mesh service needs of a libp2p host, and nothing more.

:class:`~meshollama.p2p.host.P2PHost` is the one real implementation; the
mesh service takes a :data:`HostFactory` (``P2PHost`` itself by default), so
its timers, supervision and liveness logic can be tested against an in-memory
fake under trio's ``MockClock`` (``tests/unit/test_mesh_*.py``), and only a
few tests need real libp2p on loopback.

Every method may raise :class:`~meshollama.errors.P2PError` (mapped at the
libp2p edge); whatever else escapes :meth:`Transport.serve` or one of the
service's loops on it counts as a failure of the host, which the service
rebuilds (``mesh.supervisor``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..p2p.events import Event
    from ..p2p.host import HostSettings, Message
    from ..p2p.relay import Relay
    from ..p2p.stream import Stream

Handler = Callable[["Stream"], Awaitable[None]]


@runtime_checkable
class Transport(Protocol):
    """One libp2p host, as the mesh service and ``mesh.reach`` use it."""

    events: AsyncIterable[Event]  # connected / disconnected / discovered; ends when the host closes
    relay: Relay | None  # Circuit Relay v2 client state, or None when the host has none

    def set_handler(self, protocol: str, handler: Handler) -> None:
        """Serve inbound streams on ``protocol`` (before :meth:`serve`)."""

    async def serve(self, *, task_status: Any = ...) -> None:
        """Run until cancelled; ``task_status.started(addrs)`` once listening."""

    def addrs(self) -> list[str]:
        """What we advertise, with ``/p2p/<our id>``."""
        ...

    def connected_peers(self) -> set[str]: ...

    async def connect(self, addrs: Sequence[str], *, timeout: float | None = None) -> str:
        """Connect to the peer the addresses (ending in its ``/p2p/<id>``) name."""
        ...

    def known_addrs(self, peer_id: str) -> list[str]:
        """Addresses the peerstore holds for a peer (identify, DHT, mDNS)."""
        ...

    async def open_stream(self, peer_id: str, protocol: str, *, timeout: float | None = None) -> Stream: ...

    async def disconnect(self, peer_id: str) -> None: ...

    async def publish(self, data: bytes) -> None:
        """Publish on the heartbeat topic."""

    async def next_message(self) -> Message:
        """The next heartbeat-topic message from another peer, signature verified."""
        ...

    async def dht_refresh(self) -> list[tuple[str, tuple[str, ...]]]:
        """Peers close to us in the DHT, with their addresses."""
        ...

    def dht_size(self) -> int: ...


class HostFactory(Protocol):
    """Builds a fresh host, the way ``P2PHost(key_pair, settings, ...)`` does;
    called again for every restart."""

    def __call__(
        self,
        key_pair: Any,
        settings: HostSettings,
        *,
        on_junk: Callable[[str, str], None] | None = None,
        on_addrs_changed: Callable[[], None] | None = None,
        admission: Any = None,
    ) -> Transport: ...
