"""Certificates and policies: what verifies and what does not (pure, no network)."""

from __future__ import annotations

import base64
import json

import pytest

from meshollama.errors import TrustError
from meshollama.p2p.mdns import service_fingerprint
from meshollama.trust import documents as d
from meshollama.trust.state import TrustState

NOW = 1_800_000_000
A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
SELF = "12D3KooWSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLfSeLf"


@pytest.fixture
def key():
    return d.SigningAuthority.generate()


def cert(key, peer=A, role="serve", now=NOW, exp=0):
    return d.issue_certificate(key, peer, role, now=now, expires=exp, serial="01")


def test_a_certificate_round_trips_and_names_its_authority(key):
    c = cert(key)
    got = d.decode_certificate(key.authority, c.token)
    assert (got.peer, got.role, got.iat, got.exp) == (A, "serve", NOW, 0)
    assert d.Authority.parse(key.authority.text) == key.authority
    assert d.SigningAuthority.parse(key.text).authority == key.authority


def test_a_forged_certificate_does_not_verify(key):
    payload, sig = cert(key).token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["role"] = "admin"  # promote ourselves
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode() + "." + sig
    with pytest.raises(TrustError, match="signature"):
        d.decode_certificate(key.authority, forged)


def test_another_authoritys_certificate_does_not_verify(key):
    other = d.SigningAuthority.generate()
    with pytest.raises(TrustError, match="signature"):
        d.decode_certificate(key.authority, cert(other).token)


def test_a_certificate_is_not_a_policy_and_back(key):
    c = cert(key)
    p = d.sign_policy(key, d.admit(d.Policy(), c, now=NOW))
    with pytest.raises(TrustError):
        d.decode_policy(key.authority, c.token)
    with pytest.raises(TrustError):
        d.decode_certificate(key.authority, p.token)


@pytest.mark.parametrize("junk", ["", "x", "a.b", "." * 5, "!!.!!", "A" * 10_000_000, 7])
def test_junk_is_a_trust_error(key, junk):
    with pytest.raises(TrustError):
        d.decode_certificate(key.authority, junk)
    with pytest.raises(TrustError):
        d.decode_policy(key.authority, junk)


def test_revocation_voids_older_certificates_only(key):
    old = cert(key, now=NOW)
    p = d.revoke(d.admit(d.Policy(), old, now=NOW), A, now=NOW + 10)
    assert p.cert_for(A, NOW + 20) is None and p.voids(old)
    again = cert(key, now=NOW + 11)
    p2 = d.admit(p, again, now=NOW + 11)
    assert p2.cert_for(A, NOW + 20) == again and not p2.voids(again)


def test_expired_certificates_do_not_admit(key):
    p = d.admit(d.Policy(), cert(key, exp=NOW + 60), now=NOW)
    assert p.cert_for(A, NOW + 59) is not None
    assert p.cert_for(A, NOW + 60) is None


def test_trust_state_takes_only_newer_policies(key, tmp_path):
    state = TrustState(key.authority, SELF, tmp_path)
    v1 = d.sign_policy(key, d.admit(d.Policy(), cert(key, peer=SELF, role="admin"), now=NOW))
    v2 = d.sign_policy(key, d.admit(d.decode_policy(key.authority, v1.token), cert(key), now=NOW + 5))
    assert state.offer_policy(v2.token, NOW)
    assert not state.offer_policy(v1.token, NOW), "a replayed older policy must not win"
    assert state.policy.version == v2.version and state.role_of(A, NOW) == "serve"
    assert state.own is not None and state.own.role == "admin"  # our own certificate came with it
    again = TrustState(key.authority, SELF, tmp_path)
    again.load(NOW)  # survives a restart
    assert again.policy.version == v2.version and again.own == state.own


def test_a_presented_certificate_must_be_the_presenters_own(key):
    state = TrustState(key.authority, SELF)
    token = cert(key, peer=A).token
    assert state.check_presented(B, token, NOW) is None, "B replays A's certificate"
    assert state.role_of(B, NOW) is None
    assert state.check_presented(A, token, NOW) is not None and state.role_of(A, NOW) == "serve"


def test_a_revoking_policy_forgets_presented_certificates(key):
    state = TrustState(key.authority, SELF)
    state.check_presented(A, cert(key).token, NOW)
    assert state.offer_policy(d.sign_policy(key, d.revoke(d.Policy(), A, now=NOW + 1)).token, NOW + 1)
    assert state.role_of(A, NOW + 2) is None
    assert state.check_presented(A, cert(key).token, NOW + 2) is None, "stale certificate from before the revocation"


def test_a_policy_with_a_foreign_certificate_inside_is_refused(key):
    other = d.SigningAuthority.generate()
    bad = d.Policy(version=3, certs=(cert(other),))
    with pytest.raises(TrustError):
        d.decode_policy(key.authority, d.sign_policy(key, bad).token)


def test_mdns_service_name_reveals_nothing_of_the_psk():
    psk = "ab" * 32
    name = service_fingerprint(psk)
    assert name.startswith("mo") and psk[:8] not in name and name != service_fingerprint("cd" * 32)
    assert service_fingerprint(None) == "meshollama"
