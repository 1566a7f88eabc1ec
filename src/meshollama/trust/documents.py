"""Certificates and the mesh policy: signed by the mesh authority, checked by every node (pure).

The mesh authority is one Ed25519 key (``meshollama mesh init``). What it
signs travels as ``<payload>.<signature>``, both base64url without padding;
the payload is compact JSON and the signature covers a domain prefix plus the
payload bytes, so a certificate can never be replayed as a policy (or the
other way round), nor anything signed for another purpose with the same key.

* A :class:`Certificate` says "peer P holds role R from ``iat`` until
  ``exp``" (``exp`` 0: no expiry). A peer presents its own on every new
  connection; a certificate for another peer ID proves nothing.
* A :class:`Policy` is the mesh's configuration: a version, the certificates
  of every admitted peer, revocations, API keys shared mesh-wide and routing
  defaults. Nodes gossip it and keep the highest valid version: an older
  version, even validly signed, is a replay and is ignored.
* A :class:`Revocation` of peer P at time T voids every certificate of P
  issued at or before T. Re-admitting P later issues a newer certificate.

Nothing here does I/O or reads the clock: ``now`` is passed in.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import TrustError
from ..p2p.addrs import is_peer_id

ROLES = ("serve", "gateway", "admin")  # admin: serve + manage models over the mesh
KEY_PREFIX = "ed25519:"
SECRET_PREFIX = "ed25519-secret:"
MAX_CERT_BYTES = 2048
MAX_POLICY_BYTES = 1024 * 1024
MAX_CERTS = 10_000
MAX_REVOKED = 10_000
MAX_KEYS = 1_000
_DOMAIN = {"cert": b"meshollama certificate v1\n", "policy": b"meshollama policy v1\n"}
_KEY_ROLES = ("admin", "user", "readonly")
_STRATEGIES = ("least_loaded", "round_robin", "random", "local_first")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise TrustError(f"{what}: not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TrustError(f"{what}: not base64url") from None


# --- keys ------------------------------------------------------------------------


def _key_bytes(text: str, prefix: str, what: str) -> bytes:
    """The 32 raw bytes of ``<prefix><base64url>``, or TrustError naming ``what``."""
    text = text.strip()
    if not text.startswith(prefix):
        raise TrustError(f"{what} starts with {prefix!r}")
    raw = _unb64(text[len(prefix):], what)
    if len(raw) != 32:
        raise TrustError(f"{what} is 32 bytes")
    return raw


@dataclass(frozen=True)
class Authority:
    """The mesh authority's public key: what every node of a closed mesh trusts."""

    public: bytes  # 32 raw bytes

    @classmethod
    def parse(cls, text: str) -> "Authority":
        return cls(_key_bytes(text, KEY_PREFIX, "an authority key"))

    @property
    def text(self) -> str:
        return KEY_PREFIX + _b64(self.public)

    def verify(self, token: str, kind: str, max_bytes: int) -> dict[str, Any]:
        """The payload of ``token`` if the authority signed it as ``kind``; else TrustError."""
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        if not isinstance(token, str) or len(token) > max_bytes * 4 // 3 + 100:
            raise TrustError(f"{kind}: too large or not text")
        payload_text, dot, sig_text = token.strip().partition(".")
        if not dot:
            raise TrustError(f"{kind}: expected <payload>.<signature>")
        payload, sig = _unb64(payload_text, kind), _unb64(sig_text, f"{kind} signature")
        if len(payload) > max_bytes or len(sig) != 64:
            raise TrustError(f"{kind}: bad size")
        try:
            VerifyKey(self.public).verify(_DOMAIN[kind] + payload, sig)
        except BadSignatureError:
            raise TrustError(f"{kind}: signature does not verify with this mesh's authority") from None
        try:
            obj = json.loads(payload)
        except Exception:  # ValueError, UnicodeDecodeError, RecursionError
            raise TrustError(f"{kind}: payload is not JSON") from None
        if not isinstance(obj, dict) or obj.get("typ") != kind:
            raise TrustError(f"{kind}: wrong document type")
        if obj.get("auth") != self.text:
            raise TrustError(f"{kind}: issued by another authority")
        return obj


@dataclass(frozen=True)
class SigningAuthority:
    """The private half: only ``meshollama mesh init/admit/revoke/policy`` hold it."""

    seed: bytes  # 32 raw bytes

    @classmethod
    def generate(cls) -> "SigningAuthority":
        from nacl.signing import SigningKey

        return cls(bytes(SigningKey.generate()))

    @classmethod
    def parse(cls, text: str) -> "SigningAuthority":
        return cls(_key_bytes(text, SECRET_PREFIX, "an authority secret key"))

    @property
    def text(self) -> str:
        return SECRET_PREFIX + _b64(self.seed)

    @property
    def authority(self) -> Authority:
        from nacl.signing import SigningKey

        return Authority(bytes(SigningKey(self.seed).verify_key))

    def sign(self, payload: dict[str, Any], kind: str) -> str:
        from nacl.signing import SigningKey

        body = json.dumps({**payload, "typ": kind, "auth": self.authority.text},
                          separators=(",", ":"), sort_keys=True).encode()
        sig = SigningKey(self.seed).sign(_DOMAIN[kind] + body).signature
        return f"{_b64(body)}.{_b64(sig)}"


# --- field checks ------------------------------------------------------------------


def _int(o: dict, key: str, what: str, default: int | None = None) -> int:
    v = o.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
        raise TrustError(f"{what}.{key}: expected a non-negative integer")
    return v


def _str(o: dict, key: str, what: str, limit: int = 256) -> str:
    v = o.get(key)
    if not isinstance(v, str) or not v or len(v) > limit:
        raise TrustError(f"{what}.{key}: expected a string")
    return v


def check_peer_id(peer_id: str) -> str:
    if not is_peer_id(peer_id):
        raise TrustError(f"not a peer ID: {str(peer_id)[:80]!r}")
    return peer_id


# --- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    peer: str
    role: str
    iat: int  # issued at, unix seconds
    exp: int = 0  # expires at, unix seconds; 0: never
    serial: str = ""
    token: str = field(default="", compare=False, repr=False)

    def expired(self, now: float) -> bool:
        return self.exp != 0 and now >= self.exp

    def payload(self) -> dict[str, Any]:
        return {"peer": self.peer, "role": self.role, "iat": self.iat, "exp": self.exp, "sn": self.serial}


def issue_certificate(key: SigningAuthority, peer: str, role: str, *, now: int, expires: int = 0,
                      serial: str) -> Certificate:
    check_peer_id(peer)
    if role not in ROLES:
        raise TrustError(f"role must be one of {', '.join(ROLES)}")
    cert = Certificate(peer, role, now, expires, serial)
    return replace(cert, token=key.sign(cert.payload(), "cert"))


def decode_certificate(authority: Authority, token: str) -> Certificate:
    """The certificate ``token`` if the authority signed it; validity in time is the caller's."""
    o = authority.verify(token, "cert", MAX_CERT_BYTES)
    role = _str(o, "role", "cert")
    if role not in ROLES:
        raise TrustError(f"cert.role: unknown role {role[:20]!r}")
    return Certificate(
        peer=check_peer_id(_str(o, "peer", "cert", 64)),
        role=role,
        iat=_int(o, "iat", "cert"),
        exp=_int(o, "exp", "cert", 0),
        serial=str(o.get("sn", ""))[:64],
        token=token.strip(),
    )


# --- the policy ---------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    peer: str
    at: int  # certificates of ``peer`` issued at or before this are void


@dataclass(frozen=True)
class Policy:
    version: int = 0
    iat: int = 0
    certs: tuple[Certificate, ...] = ()
    revoked: tuple[Revocation, ...] = ()
    api_keys: tuple[dict[str, str], ...] = ()  # {"id","name","role","sha256"}: hashes only
    routing: dict[str, str] = field(default_factory=dict)  # {"strategy": ...}
    # Set once mesh-wide keys were ever issued: every gateway stays closed even when
    # the last one is withdrawn (never falls back to an open, anonymous-admin gateway).
    keys_required: bool = False
    token: str = field(default="", compare=False, repr=False)

    def revoked_at(self, peer: str) -> int | None:
        """The latest revocation time of ``peer``, or None."""
        times = [r.at for r in self.revoked if r.peer == peer]
        return max(times) if times else None

    def voids(self, cert: Certificate) -> bool:
        at = self.revoked_at(cert.peer)
        return at is not None and cert.iat <= at

    def cert_for(self, peer: str, now: float) -> Certificate | None:
        """The newest certificate of ``peer`` in the policy that is in force at ``now``."""
        best = None
        for c in self.certs:
            if c.peer == peer and not c.expired(now) and not self.voids(c) and (best is None or c.iat > best.iat):
                best = c
        return best

    def payload(self) -> dict[str, Any]:
        return {
            "ver": self.version, "iat": self.iat,
            "certs": [c.token for c in self.certs],
            "revoked": [{"peer": r.peer, "at": r.at} for r in self.revoked],
            "api_keys": [dict(k) for k in self.api_keys],
            "routing": dict(self.routing),
            "keys_required": self.keys_required,
        }

    def summary(self) -> dict[str, Any]:
        """What ``meshollama policy show`` and ``GET /api/mesh/policy`` print (no key hashes)."""
        return {
            "version": self.version, "issued_at": self.iat,
            "admitted": [{"peer": c.peer, "role": c.role, "issued_at": c.iat, "expires_at": c.exp or None}
                         for c in self.certs],
            # A re-admission voids the peer's older certificates with a revocation entry
            # too; a peer holding a newer certificate is not shown as revoked.
            "revoked": [{"peer": r.peer, "at": r.at} for r in self.revoked
                        if not any(c.peer == r.peer and c.iat > r.at for c in self.certs)],
            "api_keys": [{"id": k["id"], "name": k.get("name", ""), "role": k["role"]} for k in self.api_keys],
            "routing": dict(self.routing),
            "keys_required": self.keys_required,
        }


def sign_policy(key: SigningAuthority, policy: Policy) -> Policy:
    token = key.sign(policy.payload(), "policy")
    if len(token) > MAX_POLICY_BYTES:
        raise TrustError(f"policy over {MAX_POLICY_BYTES} bytes")
    return replace(policy, token=token)


def _api_key(o: Any, i: int) -> dict[str, str]:
    what = f"policy.api_keys[{i}]"
    if not isinstance(o, dict):
        raise TrustError(f"{what}: expected an object")
    entry = {"id": _str(o, "id", what, 64), "name": str(o.get("name", ""))[:128],
             "role": _str(o, "role", what, 16), "sha256": _str(o, "sha256", what, 64)}
    if entry["role"] not in _KEY_ROLES or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise TrustError(f"{what}: bad role or digest")
    return entry


def _list(o: dict, key: str, limit: int) -> list:
    v = o.get(key, [])
    if not isinstance(v, list) or len(v) > limit:
        raise TrustError(f"policy.{key}: expected a list of at most {limit}")
    return v


def decode_policy(authority: Authority, token: str) -> Policy:
    """The policy ``token`` if the authority signed it and every entry is well formed.

    One bad certificate inside rejects the whole policy: it was signed as a
    whole, so a part that does not verify means it was not made by our tools."""
    o = authority.verify(token, "policy", MAX_POLICY_BYTES)
    certs = tuple(decode_certificate(authority, t) if isinstance(t, str) else _bad("policy.certs[]")
                  for t in _list(o, "certs", MAX_CERTS))
    revoked = []
    for r in _list(o, "revoked", MAX_REVOKED):
        if not isinstance(r, dict):
            raise TrustError("policy.revoked[]: expected an object")
        revoked.append(Revocation(check_peer_id(_str(r, "peer", "policy.revoked[]", 64)),
                                  _int(r, "at", "policy.revoked[]")))
    keys = tuple(_api_key(k, i) for i, k in enumerate(_list(o, "api_keys", MAX_KEYS)))
    routing = o.get("routing", {})
    if not isinstance(routing, dict) or any(not isinstance(v, str) for v in routing.values()):
        raise TrustError("policy.routing: expected an object of strings")
    if routing.get("strategy", "least_loaded") not in _STRATEGIES:
        raise TrustError(f"policy.routing.strategy: one of {', '.join(_STRATEGIES)}")
    required = o.get("keys_required", False)
    if not isinstance(required, bool):
        raise TrustError("policy.keys_required: expected true or false")
    return Policy(_int(o, "ver", "policy"), _int(o, "iat", "policy", 0), certs, tuple(revoked), keys,
                  {k: v for k, v in routing.items() if k == "strategy"}, required, token=token.strip())


def _bad(what: str):
    raise TrustError(f"{what}: expected a certificate string")


# --- editing (the CLI's side) ---------------------------------------------------------


def _revoked_until(policy: Policy, peer: str, at: int) -> tuple[Revocation, ...]:
    return tuple(r for r in policy.revoked if r.peer != peer) + (Revocation(peer, at),)


def admit(policy: Policy, cert: Certificate, *, now: int) -> Policy:
    """``policy`` with ``cert`` replacing every other certificate of its peer, and
    those older certificates voided: the peer still holds them, and a demoted admin
    must not be an admin again by presenting its old one. (``cert.iat`` must be
    later than any revocation of the peer: the CLI issues it so.)"""
    certs = tuple(c for c in policy.certs if c.peer != cert.peer) + (cert,)
    revoked = _revoked_until(policy, cert.peer, cert.iat - 1)
    return replace(policy, version=max(policy.version + 1, now), iat=now, certs=certs, revoked=revoked, token="")


def revoke(policy: Policy, peer: str, *, now: int) -> Policy:
    """``policy`` revoking ``peer``: its certificates are removed and voided, all of
    them, whatever the clocks that issued them said (``at`` is at least the newest
    ``iat`` the policy knows for the peer)."""
    check_peer_id(peer)
    newest = max([c.iat for c in policy.certs if c.peer == peer] + [policy.revoked_at(peer) or 0, now])
    certs = tuple(c for c in policy.certs if c.peer != peer)
    return replace(policy, version=max(policy.version + 1, now), iat=now, certs=certs,
                   revoked=_revoked_until(policy, peer, newest), token="")


def keep_revocations(policy: Policy, revocations) -> tuple[Policy, list[Revocation]]:
    """``policy`` with every revocation in ``revocations`` it lacks (or holds an older
    one of), and without the certificates they void; plus the ones added. Revocations
    are for good: a newer policy made from a stale copy must not bring a peer back."""
    merged = {r.peer: r for r in policy.revoked}
    added = []
    for r in revocations:
        if r.peer not in merged or merged[r.peer].at < r.at:
            merged[r.peer] = r
            added.append(r)
    if not added:
        return policy, []
    certs = tuple(c for c in policy.certs if c.peer not in merged or c.iat > merged[c.peer].at)
    return replace(policy, revoked=tuple(merged.values()), certs=certs), added


def newer(candidate: Policy, current: Policy) -> bool:
    """Whether ``candidate`` wins over ``current``: a higher version, or the same
    version and the larger digest, so two edits signed in the same second (the
    version is a timestamp) converge on one everywhere instead of splitting the mesh."""
    import hashlib

    if candidate.version != current.version:
        return candidate.version > current.version
    if not current.token:
        return bool(candidate.token)
    return hashlib.sha256(candidate.token.encode()).digest() > hashlib.sha256(current.token.encode()).digest()


def policy_version(authority: Authority, token: str) -> int:
    """The version of a policy the authority signed, without checking what is inside
    (one signature, not one per certificate): old news is dropped for the price of one."""
    return _int(authority.verify(token, "policy", MAX_POLICY_BYTES), "ver", "policy")


def edited(policy: Policy, *, now: int, **changes: Any) -> Policy:
    """``policy`` with other fields changed (api_keys, routing) and a new version."""
    return replace(policy, version=max(policy.version + 1, now), iat=now, token="", **changes)
