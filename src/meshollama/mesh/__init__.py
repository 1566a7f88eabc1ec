"""The mesh: who is in it, what they serve, and how to reach them.

* ``announce``: (pure) the heartbeat codec.
* ``peertable``: (pure) peer state from heartbeats and connection events.
* ``liveness``: (pure) which peers get a liveness ping this round.
* ``reach``: dialling peers by every path, backoff for unreachable ones,
  relay reservations when behind NAT.
* ``service``: runs it all on a supervised libp2p host; the gateway's view.
"""
