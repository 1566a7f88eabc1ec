"""Our gossipsub router: py-libp2p 0.8.1's ``GossipSub`` with our parameters and
three of its additions and deviations from go-libp2p undone, which left nodes
of a 25-node mesh deaf to news for up to a minute.

**Opportunistic grafting on every heartbeat.** go-libp2p grafts opportunistically
once a minute, and only when its mesh peers score below a configured threshold,
taking peers that score above their median. py-libp2p does it every heartbeat,
taking up to 2 peers whose score is at least a fraction (0.3 to 0.7) of the
median. We configure no score function, so every score is 0 and every peer qualifies: each node grafted
2 more peers each second, ``D_high`` pruned them again, and every prune is a
back-off (60 s by default). In a full mesh of 8 hosts one or two ended in no
gossip mesh at all; in 25 started nodes each was in back-off with 10 to 20 of
its 24 peers. :class:`MeshGossipSub` does not graft opportunistically: meshes
form from ``D``/``D_low``/``D_high`` alone and then stay put.

**IHAVE skips peers in back-off.** py-libp2p also leaves peers in back-off out
when it picks whom to send IHAVE gossip to (``_handle_topic_heartbeat`` asks
``_get_in_topic_gossipsub_peers_from_minus`` with ``backoff_check=True``);
go-libp2p's ``emitGossip`` does not, because back-off is about the mesh, and
gossip is what reaches the peers outside it. A node in back-off with every
peer that had it in its mesh heard nothing at all: a node that joined 15 s
later was not seen by it in 30 s (``bench_mesh.py``, 2 runs of 5), until the
joiner's next refresh. :class:`MeshGossipSub` picks gossip targets without
the back-off check; the mesh itself still honours it.

**Back-off is 15 s, not 60 s.** A peer pruned from a mesh backs off from the
pruner for its own ``prune_back_off`` (py-libp2p's heartbeat PRUNE carries no
back-off), and a GRAFT refused for being too soon comes back as a PRUNE that
carries one. A host that many peers grafted (the first one each joiner met, or
a bootstrap) prunes its surplus over ``D_high``; when the few it kept prune it
too, it grafts the ones it pruned, they refuse, and every peer it has is in
back-off: no mesh, only IHAVE gossip, until the first back-off ends, a minute
with the default. It happened in a full mesh of 8 even without opportunistic
grafting (CI, once; here 1 run in 12, back in a mesh after 13 s with 15 s).

**Adaptive gossip** is off too (``router``): with no score function it read
ordinary moments as poor health and slowed the heartbeat to 30-60 s. We set
the heartbeat ourselves instead (``HostSettings.gossip_heartbeat``, 5 s).

``tests/p2p/test_gossip.py`` shows the edges and the fixes on real hosts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .host import HostSettings


def router(s: HostSettings):
    """The gossipsub router a host runs, with our parameters."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11

    return _router_class()(
        # Not 1.2: its IDONTWANT sends every mesh neighbour an extra RPC per message to
        # spare duplicates of large ones; ours are a few hundred bytes, and that RPC
        # (with the signed peer record py-libp2p attaches) cost more than the duplicate.
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=s.gossip_degree,
        degree_low=s.gossip_degree_low,
        degree_high=s.gossip_degree_high,
        # Its mesh upkeep and IHAVE rescue gossip, every s.gossip_heartbeat (5 s; 1 s is
        # gossipsub's usual): at N=25 a node sends IHAVE to 6 peers each heartbeat with a
        # message in its window (3 heartbeats), which at 1 s cost 1.08 % of a core per idle
        # node against 0.44 % at 5 s (bench_mesh, 60 s windows). Meshes form on
        # subscription without it, and a table sync or a hello covers a joiner.
        heartbeat_interval=s.gossip_heartbeat,
        # 15 s, not gossipsub's 60 s: a host pruned by every peer it kept after pruning
        # its own surplus had no mesh until a back-off ended (the module's docstring);
        # with 15 s it is back within about 20 s. Three heartbeats is still enough to
        # keep a pair from re-grafting at every heartbeat. (Old nodes use 60 s for what
        # they refuse; a mix only means some pairs wait longer.)
        prune_back_off=s.gossip_prune_back_off,
        # Heartbeats are tiny and frequent; the default 10 msg/s/topic spam
        # limit is per forwarder and would drop relayed heartbeats in big meshes.
        max_messages_per_topic_per_second=1000.0,
        # Off: it scores "network health" every 30 s, with the peer-score part always 0
        # here (no score function), so a mesh start (12 connection events a minute), a
        # quiet minute or a mesh of 2 reads as poor health, and poor health sets the
        # gossipsub heartbeat to 30-60 s (a default of 120 s in mind): no mesh repair and
        # no IHAVE for a minute. It also moves D_low/D_high and the gossip factor.
        adaptive_gossip_enabled=False,
        # Off: it grafts up to 2 peers a heartbeat, back-off unchecked, for IP diversity
        # (inert in 0.8.1, which finds no remote address on our connections; off, so the
        # meshes staying put does not rest on that).
        eclipse_protection_enabled=False,
    )


_CLASS = None


def _router_class():
    """:class:`MeshGossipSub`, defined on first use (libp2p is imported lazily)."""
    global _CLASS
    if _CLASS is None:
        import inspect

        from libp2p.pubsub.gossipsub import GossipSub

        # The flag below is safe only while gossip_heartbeat runs without awaiting.
        assert not inspect.iscoroutinefunction(GossipSub.gossip_heartbeat), "py-libp2p changed: see p2p.gossip"

        class MeshGossipSub(GossipSub):
            _gossip_pass = False  # True while the heartbeat picks IHAVE targets

            def gossip_heartbeat(self):
                # Synchronous: nothing else runs on this router while the flag is set.
                self._gossip_pass = True
                try:
                    return super().gossip_heartbeat()
                finally:
                    self._gossip_pass = False

            def _get_in_topic_gossipsub_peers_from_minus(self, topic, num_to_select, minus, backoff_check=False):
                return super()._get_in_topic_gossipsub_peers_from_minus(
                    topic, num_to_select, minus, backoff_check and not self._gossip_pass)

            def _perform_opportunistic_grafting(self, topic, peers_to_graft) -> int:
                return 0  # with no score function it only churned (the module's docstring)

        _CLASS = MeshGossipSub
    return _CLASS
