"""Which role an HTTP request needs (pure).

Three roles, each allowed everything the one below it is:

* ``readonly``: the listings (``/api/tags``, ``/api/ps``, ``/api/version``,
  ``/v1/models[/<name>]``, ``POST /api/show``) and reading ``/api/mesh/*``;
* ``user``: inference, i.e. every routed endpoint of :mod:`.endpoints`;
* ``admin``: model management (pull, push, create, copy, delete, blobs),
  which writes and deletes files on this node, and every non-GET
  ``/api/mesh/*`` route, which changes the mesh.

The decision reuses :func:`.endpoints.match`, the function the proxy routes
with, so a path cannot be classed as one endpoint and served as another.
Unknown paths need ``user``: they answer 404 anyway, and asking for a key
first tells a stranger nothing about which routes exist.
"""

from __future__ import annotations

import enum

from . import endpoints


class Role(enum.IntEnum):
    """Ordered: a caller may do what its role or any lower one may."""

    READONLY = 1
    USER = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: object) -> Role | None:
        """``"admin"``/``"user"``/``"readonly"`` (any case), else None."""
        if not isinstance(text, str):
            return None
        return _BY_NAME.get(text.strip().lower())


_BY_NAME = {str(r): r for r in Role}
ROLE_NAMES = tuple(str(r) for r in sorted(Role, reverse=True))  # ("admin", "user", "readonly")

# The liveness probe, the orchestrator probes and the metrics scrape answer without credentials.
EXEMPT = frozenset({(m, p) for m in ("GET", "HEAD") for p in ("/", "/metrics", "/healthz", "/readyz")})
# The panel's page, script and style: static files that hold no data. Everything
# the page shows comes from /api/mesh/* with the user's own credential.
UI_PREFIX = "/ui"

_READS = frozenset({"GET", "HEAD"})
_LISTINGS = frozenset({"/api/tags", "/api/ps", "/api/version", "/v1/models"})
MESH_PREFIX = "/api/mesh/"


def required_role(method: str, path: str) -> Role | None:
    """The least role that may send ``method path``; None: no credential needed."""
    method = method.upper()
    if (method, path) in EXEMPT:
        return None
    if method in _READS and (path == UI_PREFIX or path.startswith(UI_PREFIX + "/")):
        return None
    reads = method in _READS
    if path.startswith(MESH_PREFIX):
        return Role.READONLY if reads else Role.ADMIN
    if reads and (path in _LISTINGS or path.startswith("/v1/models/")):
        return Role.READONLY
    if method == "POST" and path == "/api/show":
        return Role.READONLY
    found = endpoints.match(path)
    if found is not None and not found.routed:
        return Role.ADMIN  # any method: a wrong one answers 405, but only to an admin
    return Role.USER
