"""The mesh: who is in it, what they serve, and how to reach them.

* ``announce``: (pure) the heartbeat codec.
* ``peertable``: (pure) peer state from heartbeats and connection events.
* ``liveness``: (pure) which peers get a liveness ping this round.
* ``reach``: dialling peers by every path, backoff for unreachable ones,
  relay reservations when behind NAT.
* ``transport``: the small interface the service needs of a host
  (``P2PHost`` in use, an in-memory fake in tests on a virtual clock).
* ``supervisor``: runs a host, rebuilding it with backoff when it fails.
* ``loops``: what runs on one host: heartbeats out and in, connection
  events, liveness, bootstrap, the DHT.
* ``settings``: the service's frozen settings and plain counters.
* ``service``: runs it all on a supervised libp2p host; the gateway's view.
"""
