"""Who is admitted, from the documents at hand; kept on disk across restarts (no network).

A node of a closed mesh holds the authority's public key, the newest valid
policy it has seen and its own certificate, under ``<data_dir>/trust/``:
``authority`` (the public key, written by ``meshollama mesh init`` or taken
from ``mesh.authority``), ``policy`` and ``certificate`` (signed tokens). A
peer is admitted with role R when it presented a certificate for its own
peer ID, or the policy holds one, that is in force (signed by our authority,
not expired, not voided by a revocation); the policy's certificate wins when
both exist, so a re-issued role applies at once. Certificates peers present
are remembered for as long as they are in force, so heartbeats relayed for
a peer we are not connected to can be checked too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import ConfigError, TrustError
from .documents import (
    Authority,
    Certificate,
    Policy,
    Revocation,
    check_peer_id,
    decode_certificate,
    decode_policy,
    keep_revocations,
    newer,
    policy_version,
)

log = logging.getLogger("meshollama.trust")
audit = logging.getLogger("meshollama.audit")

TRUST_DIR = "trust"
MAX_REMEMBERED = 4096


def trust_dir(data_dir: Path) -> Path:
    return Path(data_dir) / TRUST_DIR


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text.strip() + "\n")
    os.replace(tmp, path)


def configured_authority(data_dir: Path, configured: str) -> Authority | None:
    """The authority this node trusts: ``mesh.authority`` or the one ``mesh init`` left
    in the data dir; both set and different is a configuration error."""
    path = trust_dir(data_dir) / "authority"
    stored = path.read_text().strip() if path.exists() else ""
    if configured and stored and configured != stored:
        raise ConfigError("mesh.authority", f"differs from the authority in {path}; remove one")
    text = configured or stored
    if not text:
        return None
    try:
        return Authority.parse(text)
    except TrustError as exc:
        raise ConfigError("mesh.authority", str(exc)) from None


class TrustState:
    """The documents a node holds and the decisions that follow from them."""

    def __init__(self, authority: Authority, self_id: str, data_dir: Path | None = None) -> None:
        self.authority = authority
        self.self_id = self_id
        self._dir = trust_dir(data_dir) if data_dir is not None else None
        self.policy = Policy()
        self.own: Certificate | None = None
        self._presented: dict[str, Certificate] = {}

    # --- disk ------------------------------------------------------------------------

    def load(self, now: float) -> None:
        if self._dir is None:
            return
        for name, apply in (("policy", self.offer_policy), ("certificate", self.offer_own)):
            path = self._dir / name
            if not path.exists():
                continue
            try:
                apply(path.read_text(), now, persist=False)
            except TrustError as exc:
                log.warning("ignoring %s: %s", path, exc)
        self._load_revoked(self._dir / "revoked")

    def _load_revoked(self, path: Path) -> None:
        """Revocations kept from earlier policies (see :meth:`offer_policy`)."""
        try:
            entries = json.loads(path.read_text()) if path.exists() else []
            extra = [Revocation(check_peer_id(e["peer"]), int(e["at"])) for e in entries]
        except (OSError, ValueError, TypeError, KeyError, TrustError) as exc:
            log.warning("ignoring %s: %r", path, exc)
            return
        self.policy, _ = keep_revocations(self.policy, extra)
        if self.own is not None and self.policy.voids(self.own):
            self.own = None

    def _save(self, name: str, token: str) -> None:
        if self._dir is not None:
            try:
                write_private(self._dir / name, token)
            except OSError as exc:
                log.warning("cannot save %s: %s", self._dir / name, exc)

    # --- documents in -------------------------------------------------------------------

    def offer_policy(self, token: str, now: float, *, persist: bool = True) -> bool:
        """Take ``token`` if it is a valid policy newer than ours; True if taken.
        An older or equal version is a replay (or old news) and changes nothing."""
        if policy_version(self.authority, token) < self.policy.version:
            return False  # cheap: certificates inside are not even checked
        policy = decode_policy(self.authority, token)
        if not newer(policy, self.policy):
            return False
        # Revocations are for good: one a newer policy left out (an operator who
        # edited a stale copy) still applies. Re-admission is a newer certificate.
        policy, kept = keep_revocations(policy, self.policy.revoked)
        for r in kept:
            log.warning("policy version %d leaves out the revocation of %s: kept", policy.version, r.peer)
        self.policy = policy
        if persist:  # the union, which the signed token alone may not carry
            self._save("revoked", json.dumps([{"peer": r.peer, "at": r.at} for r in policy.revoked]))
        for peer, cert in list(self._presented.items()):
            if policy.voids(cert):
                del self._presented[peer]
        if persist:
            self._save("policy", policy.token)
        mine = policy.cert_for(self.self_id, now)
        if mine is not None and (self.own is None or mine.iat > self.own.iat):
            self.own = mine
            if persist:
                self._save("certificate", mine.token)
        if self.own is not None and policy.voids(self.own):
            log.error("this node's certificate was revoked by policy version %d", policy.version)
            self.own = None
        audit.info("mesh policy version %d applied: %d admitted, %d revoked", policy.version,
                   len(policy.certs), len(policy.revoked))
        return True

    def offer_own(self, token: str, now: float, *, persist: bool = True) -> None:
        cert = decode_certificate(self.authority, token)
        if cert.peer != self.self_id:
            raise TrustError(f"certificate is for {cert.peer}, not this node ({self.self_id})")
        if self.policy.voids(cert):
            raise TrustError("certificate was revoked")
        self.own = cert
        if persist:
            self._save("certificate", cert.token)

    def own_token(self, now: float) -> str:
        own = self.own
        return own.token if own is not None and not own.expired(now) else ""

    # --- decisions -----------------------------------------------------------------------

    def check_presented(self, peer: str, token: str, now: float) -> Certificate | None:
        """The certificate ``peer`` presented, if it is its own and in force (else None,
        with the reason logged); remembered for later announcements."""
        if not token:
            return None
        try:
            cert = decode_certificate(self.authority, token)
        except TrustError as exc:
            log.info("peer %s presented a bad certificate: %s", peer, exc)
            return None
        if cert.peer != peer:
            log.warning("peer %s presented the certificate of %s: refused", peer, cert.peer)
            return None
        if cert.expired(now) or self.policy.voids(cert):
            log.info("peer %s presented an expired or revoked certificate", peer)
            return None
        if len(self._presented) >= MAX_REMEMBERED and peer not in self._presented:
            self._presented.pop(next(iter(self._presented)))
        self._presented[peer] = cert
        return cert

    def certificate_of(self, peer: str, now: float) -> Certificate | None:
        """The certificate that admits ``peer`` now, or None."""
        if peer == self.self_id:
            return self.own if self.own is not None and not self.own.expired(now) else None
        found = self.policy.cert_for(peer, now)
        if found is not None:
            return found
        cert = self._presented.get(peer)
        if cert is not None and (cert.expired(now) or self.policy.voids(cert)):
            del self._presented[peer]
            return None
        return cert

    def role_of(self, peer: str, now: float) -> str | None:
        cert = self.certificate_of(peer, now)
        return cert.role if cert is not None else None
