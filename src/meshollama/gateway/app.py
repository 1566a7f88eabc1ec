"""The gateway application: Quart-Trio views behind two ASGI layers.

Request path, outermost first::

    Gate (CORS, Host, credentials, roles)  ->  ProxyRoutes (routed + management endpoints, raw ASGI)
                                    -> Quart views (listings, status, metrics, 404/405)

The proxied endpoints bypass Quart's views on purpose (see ``proxy.py``);
Quart serves everything that answers from memory. ``create_app`` still
returns the :class:`~quart_trio.QuartTrio` instance: the layers are mounted
on ``app.asgi_app``, Quart's supported middleware hook.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from quart import Response, request
import trio
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from .. import __version__, names
from ..backends.ollama_api import OLLAMA_VERSION
from ..httpmsg import Upstream
from ..mesh.peertable import Snapshot
from ..models import listing as model_listing
from ..tracing import for_app as tracer_for_app
from . import listings, panel_routes, policy_routes
from .auth import Authenticator
from .cors import CorsPolicy
from .errors import METHOD_NOT_ALLOWED_PAGE, Answer, not_found_answer, error_answer, json_answer, text_answer
from .hosts import HostPolicy
from .jwt_auth import JwtVerifier
from .keystore import KeyStore
from .metrics import GatewayMetrics
from .middleware import Gate
from .proxy import Proxy
from .proxy_routes import ProxyRoutes
from .traffic import Traffic

log = logging.getLogger(__name__)

# What /api/version reports. Clients gate features on it (tools, thinking,
# /api/embed), so it claims a recent Ollama whose API we pass through.
OLLAMA_COMPAT_VERSION = OLLAMA_VERSION
EXTENSION = "meshollama"  # app.extensions key holding the GatewayState


class MeshView(Protocol):
    """What the node gives the gateway."""

    self_id: str

    def snapshot(self) -> Snapshot: ...

    def upstream(self, peer_id: str) -> Upstream: ...

    def status(self) -> dict: ...


class GatewayState:
    """Everything the views and ``serve_gateway`` need, kept on ``app.extensions``."""

    def __init__(self, config: Any, mesh: MeshView, backend: Upstream | None, registry: CollectorRegistry) -> None:
        self.config = config
        self.gateway = config.gateway
        self.mesh = mesh
        self.backend = backend
        self.registry = registry
        self.metrics = GatewayMetrics(registry)
        self.proxy = Proxy(self.gateway, mesh, backend, self.metrics)
        self.traffic = self.proxy.traffic = Traffic()  # the panel's charts and last requests
        # API keys of every source; the mesh policy feeds ``keystore.set_shared``.
        self.keystore = KeyStore.for_config(config)
        self.auth = Authenticator(self.keystore, JwtVerifier.from_config(self.gateway))
        # Set by the node: start draining it (POST /api/mesh/drain); None where nothing can drain.
        self.drain: Any = None
        self.models: Any = None  # models.service.ModelService, set by the node
        # Set by the node: () -> {"ready": bool, "checks": {name: {"ok": bool, "detail": str}}} for /readyz.
        self.readiness: Any = None
        # Set when the server begins to shut down: endless answers (the panel's event stream) end then.
        self.closing = trio.Event()
        # Called before each /metrics answer: gauges that mirror state (the node's peer
        # gauges) are set when someone looks, not on a timer that wakes an idle node.
        self.before_scrape: list[Any] = []


class _HTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's connection, with every ``send`` shielded from cancellation.

    Quart-Trio cancels a request's tasks as soon as Hypercorn reports the
    exchange closed, and Hypercorn reports that from *inside* the final
    ``send``, before it has re-armed the connection's keep-alive timer. The
    cancellation aborts that re-arming, so every keep-alive connection that
    served a Quart view was never closed by the server: not after
    ``keep_alive_timeout``, and not on shutdown, which then waited out the
    whole grace period. Hypercorn shields its socket writes anyway, so
    shielding the call costs nothing.
    """

    async def handle_request(self, nursery: trio.Nursery, request: Any, send: Any) -> None:  # type: ignore[override]
        async def shielded(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await super().handle_request(nursery, request, shielded)


def _respond(answer: Answer) -> Response:
    return Response(answer.body, status=answer.status, headers=list(answer.headers))


def create_app(config: Any, mesh: MeshView, backend: Upstream | None, registry: CollectorRegistry) -> QuartTrio:
    """The gateway for one node. ``config.gateway`` supplies listen, api_keys,
    max_body_bytes, routing, retries, sideline_seconds, cors_origins, max_concurrent,
    allowed_hosts and the jwt_* keys; ``config.node.data_dir`` holds the key file.
    Raises :class:`~meshollama.errors.ConfigError` for an unusable JWT key file."""
    state = GatewayState(config, mesh, backend, registry)
    app = QuartTrio(__name__)
    app.asgi_http_class = _HTTPConnection  # type: ignore[assignment]
    app.config.update(
        RESPONSE_TIMEOUT=None,  # Quart's 60 s default would cut long answers
        BODY_TIMEOUT=None,
        MAX_CONTENT_LENGTH=state.gateway.max_body_bytes,
        PROVIDE_AUTOMATIC_OPTIONS=False,  # OPTIONS is CORS's business (middleware)
    )
    app.extensions[EXTENSION] = state
    state.tracer = state.proxy.tracer = tracer_for_app(app, config, mesh, registry)  # docs/tracing.md
    _register_views(app, state)
    policy_routes.register(app, mesh, _respond)
    panel_routes.register(app, state, _respond)
    _register_errors(app)
    app.asgi_app = Gate(  # type: ignore[method-assign]
        ProxyRoutes(state.proxy, app.asgi_app),
        cors=CorsPolicy(state.gateway.cors_origins or ()),
        auth=state.auth,
        hosts=HostPolicy.for_config(state.gateway),
        metrics=state.metrics,
    )
    return app


def _register_views(app: QuartTrio, state: GatewayState) -> None:
    mesh = state.mesh

    @app.route("/", methods=["GET", "HEAD"])
    async def root() -> Response:
        return _respond(text_answer(200, "Ollama is running"))

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        # Liveness: the process answers. Also what `--bootstrap http://HOST:PORT` reads to learn
        # the peer id and addresses to dial (public anyway: any dialler of the p2p port learns them).
        status = mesh.status()
        return _respond(json_answer({"status": "ok", "peer_id": mesh.self_id, "version": __version__,
                                     "p2p_addrs": list(status.get("p2p_addrs", ()))}))

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> Response:
        # Readiness: the mesh is joined and the backend answers (503 with the failing check otherwise).
        report = state.readiness() if state.readiness is not None else {"ready": True, "checks": {}}
        return _respond(json_answer(report, 200 if report["ready"] else 503))

    @app.route("/api/version", methods=["GET", "HEAD"])
    async def version() -> Response:
        return _respond(json_answer({"version": OLLAMA_COMPAT_VERSION}))

    @app.route("/api/tags", methods=["GET", "HEAD"])
    async def tags() -> Response:
        return _respond(json_answer(listings.tags(mesh.snapshot())))

    @app.route("/api/ps", methods=["GET"])
    async def ps() -> Response:
        return _respond(json_answer(listings.ps(mesh.snapshot(), time.time())))

    @app.route("/v1/models", methods=["GET"])
    async def openai_models() -> Response:
        return _respond(_openai_json(listings.openai_models(mesh.snapshot())))

    @app.route("/v1/models/<model>", methods=["GET"])
    async def openai_model(model: str) -> Response:
        found = listings.openai_model(mesh.snapshot(), model)
        if found is None:
            short = names.shortest(model)
            return _respond(error_answer(404, f"model '{short}' not found", envelope="openai"))
        return _respond(_openai_json(found))

    @app.route("/api/mesh/peers", methods=["GET"])
    async def mesh_peers() -> Response:
        return _respond(json_answer(listings.mesh_peers(mesh.snapshot())))

    @app.route("/api/mesh/status", methods=["GET"])
    async def mesh_status() -> Response:
        extra = {**mesh.status(), "queue": state.proxy.queues.depths(), "gateway_in_flight": state.proxy.in_flight}
        return _respond(json_answer(listings.mesh_status(mesh.snapshot(), mesh.self_id, extra, __version__)))

    @app.route("/api/mesh/drain", methods=["POST"])
    async def mesh_drain() -> Response:
        # Admin only (roles: every non-read /api/mesh/ route). Idempotent: a second call reports progress.
        if state.drain is None:
            return _respond(error_answer(400, "this gateway has no node to drain"))
        return _respond(json_answer(state.drain(), 202))

    @app.route("/api/mesh/models", methods=["GET"])
    async def mesh_models() -> Response:
        if state.models is None:  # the same rows, without copy targets or pulls
            rows = model_listing.sorted_rows(model_listing.holder_rows(mesh.snapshot()))
            return _respond(json_answer({"models": rows, "store": None}))
        return _respond(json_answer(state.models.mesh_models()))

    @app.route("/api/mesh/replicate", methods=["POST"])
    async def mesh_replicate() -> Response:
        # Admin only, like every non-read /api/mesh/ route.
        replicator = getattr(state.models, "replicator", None)
        if replicator is None:
            return _respond(error_answer(400, "this gateway has no node to keep copies on"))
        admission = getattr(mesh, "admission", None)
        if admission is not None and admission.known_role(mesh.self_id) != "admin":
            return _respond(error_answer(409, "this node is not admitted as admin: other nodes take copy counts "
                                              "only from admins; run meshollama replicate on an admin node"))
        body = await request.get_json(force=True, silent=True)
        problem = _replicate_problem(body)
        if problem:
            return _respond(error_answer(400, problem))
        target = replicator.set_target(body["model"], body["copies"], tuple(body.get("labels") or ()))
        return _respond(json_answer({"model": target.model, "copies": target.copies, "labels": list(target.labels),
                                     "stamp": target.stamp}))

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        for update in state.before_scrape:
            try:
                update()
            except Exception:  # a gauge that cannot be set must not cost the scrape the rest
                log.exception("updating gauges before a scrape failed")
        return Response(generate_latest(state.registry), status=200, content_type=CONTENT_TYPE_LATEST)


def _replicate_problem(body: Any) -> str:
    """What is wrong with a ``POST /api/mesh/replicate`` body, or ``""``."""
    if not isinstance(body, dict):
        return "expected a JSON object: {\"model\": NAME, \"copies\": N}"
    model, copies, labels = body.get("model"), body.get("copies"), body.get("labels", [])
    if not isinstance(model, str) or not names.is_valid(model):
        return "model: expected a valid model name"
    if not isinstance(copies, int) or isinstance(copies, bool) or not 0 <= copies <= 64:
        return "copies: expected an integer from 0 to 64"
    if not isinstance(labels, list) or len(labels) > 16 or not all(
            isinstance(x, str) and re.fullmatch(r"[A-Za-z0-9_.:=-]{1,64}", x) for x in labels):
        return "labels: expected at most 16 labels of letters, digits and _.:=- (64 characters each)"
    return ""


def _openai_json(obj: object) -> Answer:
    answer = json_answer(obj)
    return Answer(answer.status, (("content-type", "application/json"),), answer.body)


def _register_errors(app: QuartTrio) -> None:
    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return _respond(not_found_answer(request.path))

    @app.errorhandler(405)
    async def method_not_allowed(_: Exception) -> Response:
        return _respond(METHOD_NOT_ALLOWED_PAGE)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return _respond(error_answer(exc.code or 500, exc.description or exc.name))

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("gateway view failed")
        return _respond(error_answer(500, f"internal error ({type(exc).__name__})"))
