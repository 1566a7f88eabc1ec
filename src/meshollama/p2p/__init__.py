"""The only package that imports py-libp2p.

py-libp2p is young (see docs/architecture.md, "py-libp2p sharp edges"): every
workaround for it lives here, every stream operation has a timeout, and its
exceptions are mapped to :mod:`meshollama.errors` before they leave.

* ``events``: connection events, coalesced per peer so none is ever dropped.
* ``host``: build and run a Noise-only, Yamux, optionally PSK-protected host
  with GossipSub, the Kademlia DHT, mDNS and relay; connection events; publish.
* ``addrs``: (pure) the addresses we advertise, which announced ones we keep,
  the order we dial a peer's addresses in.
* ``dial``: dial one peer by each of its addresses in turn, relays last.
* ``mdns``: LAN discovery on our own service name, with real addresses.
* ``relay``: Circuit Relay v2 (serve, reserve, dial through) and DCUtR.
* ``patches``: process-wide fixes (DHT protocol ID, pubsub junk handling) and
  the admission gate on every inbound stream (``gate_inbound_streams``).
* ``stream``: a libp2p stream with timeouts and error mapping.
* ``httpstream``: HTTP requests over libp2p streams (the client, shared parts).
* ``httpserver``: their server: limits taken from the request head, before its body.
* ``intake``: (pure) what the server admits: sizes, the byte budget, the deadline.
* ``ping``: our own liveness check (py-libp2p never notices a frozen peer).
* ``keys``: the node's key pair: create, (de)serialise, peer ID
  (:mod:`meshollama.identity` keeps the key file).
"""
