"""The web control panel: its static files at ``/ui/`` and the JSON and events it reads.

* ``GET /ui`` redirects to ``/ui/``, which is ``index.html``; ``GET /ui/<name>``
  is one of the files shipped in ``meshollama/panel/static``. The set of
  names is read once at import into memory: a request path is looked up in
  that table, never joined to a filesystem path, so no spelling of ``..``
  reaches a file outside it. The gate lets these through without a
  credential (:mod:`.roles`): they hold no data.
* ``GET /api/mesh/whoami``: the caller's role (the panel hides what the role
  may not do); ``GET /api/mesh/traffic``: :meth:`.traffic.Traffic.snapshot`;
  ``GET /api/mesh/events``: the live updates (:mod:`.panel_events`). These
  need the readonly role, like every ``GET /api/mesh/*``.

The gate checks a credential when a request arrives; an event stream lasts,
so it is checked again every tick (:func:`credential_check`): a key that was
revoked or whose role changed, a gateway that was open and now needs keys,
end the stream. A JWT's expiry is not known here, so a stream opened with
one ends after :data:`JWT_STREAM_SECONDS` and the client reconnects,
presenting its token again.

Every panel answer carries a strict Content-Security-Policy (no inline
script or style, nothing from another origin, not frameable), ``nosniff``
and ``no-referrer``. Cross-origin pages are refused by the gate's CORS check.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import trio
from quart import Response, request

from .auth import Authenticator, Caller
from .errors import error_answer, json_answer
from .middleware import CALLER_KEY
from .panel_events import (
    JWT_STREAM_SECONDS,
    REAUTHENTICATE,
    REVOKED,
    ROLE_CHANGED,
    Feeds,
    hello_payload,
    whoami,
)
from .roles import Role

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)
TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
}
_SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.([a-z]+)\Z")
STREAMS_BUSY_RETRY = 10  # seconds, in Retry-After when the event streams are all taken


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(package: str = "meshollama.panel", folder: str = "static") -> dict[str, Asset]:
    """Every servable file of the panel's static folder, by name (flat, known types only)."""
    out: dict[str, Asset] = {}
    try:
        root = resources.files(package) / folder
        entries = list(root.iterdir())
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        log.warning("the panel's static files are missing: /ui answers 404")
        return out
    for entry in entries:
        found = _SAFE_NAME.match(entry.name)
        if found is None or found.group(1) not in TYPES or not entry.is_file():
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        out[entry.name] = Asset(body, TYPES[found.group(1)], etag)
    return out


ASSETS = load_assets()


def _panel_response(body: bytes, status: int, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(body, status=status, headers=list(SECURITY_HEADERS + headers))


def asset_response(name: str, if_none_match: str | None) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        return _panel_response(b"404 page not found", 404, (("content-type", TYPES["txt"]),))
    headers = (("content-type", asset.content_type), ("etag", asset.etag), ("cache-control", "no-cache"))
    if if_none_match and asset.etag in {t.strip() for t in if_none_match.split(",")}:
        return _panel_response(b"", 304, headers[1:])
    return _panel_response(asset.body, 200, headers)


def credential_check(auth: Authenticator, caller: Caller | None, *, clock: Callable[[], float] = trio.current_time,
                     jwt_lifetime: float = JWT_STREAM_SECONDS) -> Callable[[], str | None]:
    """``check()`` for an event stream of ``caller``: None while its credential
    still lets it read the mesh, else why the stream ends (a bye reason)."""
    opened = clock()

    def check() -> str | None:
        now = clock()
        auth.keys.refresh(now)  # the gate's clock: the key file is looked at once a second at most
        if not auth.configured:
            return None  # an open gateway: everyone may read
        if caller is None or caller.kind == "anonymous":
            return REVOKED  # opened while the gateway was open; it needs a credential now
        if caller.kind == "jwt":
            if auth.jwt is None:
                return REVOKED
            return REAUTHENTICATE if now - opened >= jwt_lifetime else None
        role = auth.key_role(caller)
        if role is None or role < Role.READONLY:
            return REVOKED
        return ROLE_CHANGED if role != caller.role else None

    return check


def stream_owner(caller: Caller | None, scope: dict[str, Any]) -> str:
    """Whose stream it is, for the per-caller limit: the key or JWT subject, else the client's address."""
    if caller is not None and caller.kind != "anonymous":
        return f"{caller.kind}:{caller.ident}"
    client = scope.get("client")
    return f"address:{client[0] if client else '-'}"


def register(app: Any, state: Any, respond: Callable) -> None:
    feeds = Feeds(state)
    state.panel_feeds = feeds  # for tests and the node's own status, if it wants the stream count

    @app.route("/ui", methods=["GET"])
    async def ui_root() -> Response:
        return _panel_response(b"", 308, (("location", "/ui/"),))

    @app.route("/ui/", methods=["GET"])
    async def ui_index() -> Response:
        return asset_response("index.html", request.headers.get("if-none-match"))

    @app.route("/ui/<path:name>", methods=["GET"], merge_slashes=False)  # "//x": 404, not a redirect
    async def ui_asset(name: str) -> Response:
        return asset_response(name, request.headers.get("if-none-match"))

    @app.route("/api/mesh/whoami", methods=["GET"])
    async def mesh_whoami() -> Response:
        return respond(json_answer(whoami(request.scope.get(CALLER_KEY))))

    @app.route("/api/mesh/traffic", methods=["GET"])
    async def mesh_traffic() -> Response:
        return respond(json_answer(state.traffic.snapshot()))

    @app.route("/api/mesh/events", methods=["GET"])
    async def mesh_events() -> Response:
        if request.method == "HEAD":  # the head alone: no stream to hold open
            return Response(b"", 200, headers=[("content-type", "text/event-stream; charset=utf-8")])
        caller = request.scope.get(CALLER_KEY)
        hello = hello_payload(state.mesh.self_id, caller, not state.auth.configured, feeds.heartbeat)
        stream = feeds.stream(hello, state.closing, owner=stream_owner(caller, request.scope),
                              check=credential_check(state.auth, caller, jwt_lifetime=feeds.jwt_lifetime))
        if isinstance(stream, str):
            answer = error_answer(503, stream)
            return respond(answer.with_headers(("retry-after", str(STREAMS_BUSY_RETRY))))
        response = Response(stream, status=200, headers=[
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache, no-transform"),
            ("x-accel-buffering", "no"),  # a reverse proxy in front must not hold events back
            ("x-content-type-options", "nosniff"),
        ])
        response.timeout = None  # endless: ends when the client leaves or the server closes
        return response
