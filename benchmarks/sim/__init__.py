"""Discrete-event mesh simulation driving the real cadence / announce /
peer-table / down-hint / liveness / routing code over a modelled network
with a virtual clock.

Entry point: ``benchmarks/sim_mesh.py``. Roles:

* :mod:`.events`: the virtual clock and event queue;
* :mod:`.params`: every modelling constant (gossip, cost calibration, timeouts);
* :mod:`.node`: one simulated node (its real ``PeerTable``, ``AnnouncePolicy``,
  ``DownHints``, ``RouteStats``) and its server slots;
* :mod:`.network`: membership, connections, crashes, leaves, liveness rounds
  and the cost counters, with the roles below mixed in;
* :mod:`.gossip`: the publish loop, gossip delivery, ``accept`` and down hints;
* :mod:`.pull`: table sync on a new connection (``mesh.sync``);
* :mod:`.traffic`: request routing and serving;
* :mod:`.scenarios`: cost vs N, convergence, churn, load balance, calibration;
* :mod:`.plots`: PNGs for the docs.
"""
