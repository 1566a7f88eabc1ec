"""Optional API keys (``gateway.api_keys``), pure.

With no keys configured the gateway is open, as Ollama is. With keys, every
request needs ``Authorization: Bearer <key>`` except the liveness probe
(``GET``/``HEAD /``) and the metrics scrape (``GET /metrics``). A valid key is
ours: the middleware removes the header so it never reaches a peer or a
backend.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

EXEMPT = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/metrics"), ("HEAD", "/metrics")})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class ApiKeys:
    """The accepted keys; compared in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        # Digests make every comparison the same length, so timing leaks
        # neither the key nor its length.
        self._digests = tuple(_digest(k) for k in keys if k)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True if the header carries one of our keys."""
        token = bearer_token(authorization)
        if token is None:
            return False
        candidate = _digest(token)
        ok = False
        for d in self._digests:  # no early exit: same time whichever key matches
            ok |= hmac.compare_digest(candidate, d)
        return ok

    @staticmethod
    def exempt(method: str, path: str) -> bool:
        return (method, path) in EXEMPT
