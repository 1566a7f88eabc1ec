"""Who is calling and whether they may: the decisions of the gate (pure).

A request carries ``Authorization: Bearer <token>``. The token is first
looked up among the API keys (:class:`~.keystore.KeyStore`: the key file,
mesh-shared keys and ``gateway.api_keys``); if it is none of them, looks
like a JWT (two dots) and JWT is configured, it is verified as one
(:mod:`.jwt_auth`). The caller then needs the role :func:`.roles.required_role`
names for the request.

With nothing configured (no key of any source, no key file, no JWT key) the
gateway is open, as Ollama is: every caller is an anonymous admin.

Answers: 401 (with ``WWW-Authenticate: Bearer``) when the credential is
missing or not ours, the same text whatever was wrong so a prober learns
nothing; 403 when it is ours but its role is too low, or a genuine JWT
grants no known role. The middleware sends them and does the I/O.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from .jwt_auth import JwtVerifier, TokenRejected, looks_like_jwt
from .keystore import KeyStore
from .roles import Role

log = logging.getLogger(__name__)

UNAUTHORIZED = "unauthorized"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    role: Role
    kind: str  # "key" (key file), "shared" (mesh policy), "config" (gateway.api_keys), "jwt", "anonymous"
    ident: str = "anonymous"  # key id, or the JWT's sub
    name: str = ""

    @property
    def label(self) -> str:
        """The ``key`` label of the per-key counter. Every JWT counts as one "jwt":
        an identity provider's subjects are unbounded, metric series must not be."""
        if self.kind == "jwt":
            return "jwt"
        return self.name or self.ident

    @property
    def who(self) -> str:
        """The caller in the audit log."""
        if self.kind == "anonymous":
            return "anonymous"
        name = f"({self.name})" if self.name and self.name != self.ident else ""
        return f"{self.kind}:{self.ident}{name}"


ANONYMOUS = Caller(Role.ADMIN, "anonymous")


@dataclass(frozen=True)
class Refusal:
    """A request the gate answers itself."""

    status: int  # 401 or 403
    message: str
    reason: str  # metrics label: "unauthenticated", "no_role", "forbidden", "host"
    who: str = "unauthenticated"  # for the audit log

    @property
    def challenge(self) -> bool:
        return self.status == 401


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Caller` or a :class:`Refusal`."""

    def __init__(self, keys: KeyStore, jwt: JwtVerifier | None = None) -> None:
        self.keys = keys
        self.jwt = jwt

    @property
    def configured(self) -> bool:
        """False: the gateway is open to everyone."""
        return self.jwt is not None or self.keys.configured

    def authenticate(self, authorization: str | None, now: float) -> Caller | Refusal:
        """``now``: a monotonic clock, for how often the key file is looked at."""
        self.keys.refresh(now)
        if not self.configured:
            return ANONYMOUS
        token = bearer_token(authorization)
        if token is None:
            return Refusal(401, UNAUTHORIZED, "unauthenticated")
        entry = self.keys.match(token)
        if entry is not None:
            return Caller(entry.role, _kind(entry.source), entry.id, entry.name)
        if self.jwt is not None and looks_like_jwt(token):
            return self._from_jwt(token)
        return Refusal(401, UNAUTHORIZED, "unauthenticated")

    def key_role(self, caller: Caller) -> Role | None:
        """The role the key behind ``caller`` has now; None when it no longer exists.
        For a caller that came with a key (not a JWT or an anonymous one), to
        re-check it while a long answer runs. The store is as of the last ``refresh``."""
        for entry in self.keys.entries():
            if entry.id == caller.ident and _kind(entry.source) == caller.kind:
                return entry.role
        return None

    def _from_jwt(self, token: str) -> Caller | Refusal:
        assert self.jwt is not None
        try:
            claims = self.jwt.verify(token)
        except TokenRejected as exc:
            log.debug("JWT refused: %s", exc)
            return Refusal(401, UNAUTHORIZED, "unauthenticated")
        role = self.jwt.role_of(claims)
        subject = str(claims.get("sub") or "?")
        if role is None:
            return Refusal(403, f"forbidden: the token's '{self.jwt.role_claim}' claim names no role "
                                "(expected admin, user or readonly)", "no_role", f"jwt:{subject}")
        return Caller(role, "jwt", subject)


def authorize(caller: Caller, required: Role, method: str, path: str) -> Refusal | None:
    """None if ``caller`` may send ``method path``, else the 403 to answer."""
    if caller.role >= required:
        return None
    return Refusal(403, f"forbidden: {method} {path} needs the {required} role, the caller has {caller.role}",
                   "forbidden")


_PLAIN = re.compile(r"[\w.:/@()\[\]+,-]+\Z", re.ASCII)


def _value(text: str) -> str:
    # A path may carry a decoded %0A, a name or a JWT subject anything: quoted
    # as JSON, no value can forge another field or another line.
    return text if _PLAIN.match(text) else json.dumps(text)


def audit_message(who: str, client: str, method: str, path: str, status: int | None) -> str:
    """One audit line, ``key=value`` so log shippers can split it."""
    fields = {"who": who, "client": client, "method": method, "path": path, "status": str(status or "-")}
    return " ".join(f"{k}={_value(v)}" for k, v in fields.items())


def _kind(source: str) -> str:
    """A caller's ``kind`` from its key's source: the key file's keys are plain "key"."""
    return "key" if source == "local" else source
