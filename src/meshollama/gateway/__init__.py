"""The Ollama- and OpenAI-compatible HTTP API of a node (Quart-Trio on Hypercorn).

* ``app``: ``create_app(config, mesh, backend, registry)``, the Quart views
  (listings, version, mesh status, metrics) and the ASGI layers in front.
* ``server``: ``serve_gateway(app, listen, tls=..., task_status=...)`` on
  Hypercorn's trio worker, TLS and mTLS, graceful shutdown.
* ``proxy``: the routed-request engine (choose a peer, retry before the first
  byte, relay the stream, cancel the upstream when the client leaves).
* ``endpoints``: the proxied routes, Ollama's per-endpoint error texts, body validation.
* ``listings``: pure builders for /api/tags, /api/ps, /v1/models, mesh status.
* ``errors``: the one place mapping exceptions to HTTP answers.
* ``middleware``: the gate in front of every route: Host check (``hosts``),
  CORS (``cors``), the caller's credential (``auth``: ``keystore`` API keys,
  ``jwt_auth`` tokens) against the role the route needs (``roles``), the audit log.
* ``policy_routes``: ``GET/POST /api/mesh/policy``, the signed mesh policy.
* ``asgi``: raw ASGI helpers (bounded body reads, a send wrapper).
* ``metrics``: Prometheus metrics of the gateway and the mesh.
"""

from .app import MeshView, create_app
from .metrics import GatewayMetrics, MeshMetrics
from .server import serve_gateway

__all__ = ["GatewayMetrics", "MeshMetrics", "MeshView", "create_app", "serve_gateway"]
