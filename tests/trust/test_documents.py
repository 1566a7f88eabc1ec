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


def test_a_demoted_admin_cannot_present_its_old_certificate(key):
    old = cert(key, role="admin", now=NOW)
    p = d.admit(d.Policy(), old, now=NOW)
    demoted = cert(key, role="gateway", now=NOW + 5, exp=NOW + 100)
    p = d.sign_policy(key, d.admit(p, demoted, now=NOW + 5))
    state = TrustState(key.authority, SELF)
    assert state.offer_policy(p.token, NOW + 6)
    assert state.check_presented(A, old.token, NOW + 6) is None
    assert state.role_of(A, NOW + 6) == "gateway"
    assert state.role_of(A, NOW + 200) is None, "once the new one expires, the old one must not come back"


def test_a_revocation_voids_certificates_from_a_clock_that_ran_ahead(key):
    ahead = cert(key, now=NOW + 3600)  # issued by a machine whose clock is an hour fast
    p = d.revoke(d.admit(d.Policy(), ahead, now=NOW), A, now=NOW + 1)
    assert p.voids(ahead)


def test_two_policies_of_one_version_converge_everywhere(key):
    base = d.Policy(version=NOW)
    p1 = d.sign_policy(key, d.admit(base, cert(key, peer=A), now=NOW))
    p2 = d.sign_policy(key, d.revoke(base, B, now=NOW))
    assert p1.version == p2.version
    x, y = TrustState(key.authority, SELF), TrustState(key.authority, SELF)
    for token in (p1.token, p2.token):
        x.offer_policy(token, NOW)
    for token in (p2.token, p1.token):
        y.offer_policy(token, NOW)
    assert x.policy.token == y.policy.token


def test_a_policy_that_forgets_a_revocation_does_not_bring_the_peer_back(key, tmp_path):
    state = TrustState(key.authority, SELF, tmp_path)
    admitted = d.admit(d.Policy(), cert(key, now=NOW), now=NOW)
    assert state.offer_policy(d.sign_policy(key, d.revoke(admitted, A, now=NOW + 1)).token, NOW + 2)
    # An operator edits a stale copy (from before the revocation) and signs it.
    stale_edit = d.sign_policy(key, d.admit(admitted, cert(key, peer=B, now=NOW + 9), now=NOW + 9))
    assert state.offer_policy(stale_edit.token, NOW + 10)
    assert state.role_of(A, NOW + 10) is None and state.role_of(B, NOW + 10) == "serve"
    again = TrustState(key.authority, SELF, tmp_path)
    again.load(NOW + 11)
    assert again.role_of(A, NOW + 11) is None, "kept across a restart"


def test_an_older_policy_is_dropped_before_its_certificates_are_checked(key, monkeypatch):
    state = TrustState(key.authority, SELF)
    many = d.Policy(version=NOW, certs=tuple(cert(key, peer="12D3KooW" + "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"[i] * 44) for i in range(49)))
    old = d.sign_policy(key, many)
    assert state.offer_policy(d.sign_policy(key, d.Policy(version=NOW + 1)).token, NOW)
    calls = []
    monkeypatch.setattr(d, "decode_certificate", lambda *a: calls.append(a))
    assert not state.offer_policy(old.token, NOW)
    assert calls == []


def test_withdrawing_the_last_mesh_wide_key_keeps_the_gateway_closed():
    from meshollama.gateway.keystore import KeyStore, new_key

    store = KeyStore(None)
    _, entry = new_key("user", "x")
    store.set_shared([entry], required=True)
    assert store.configured
    store.set_shared([], required=True)
    assert store.configured, "no fall back to an open gateway"
    assert not KeyStore(None).configured


def test_the_peer_surface_asks_admission_on_every_request():
    """A stream kept alive from before a revocation must serve nothing after it."""
    from meshollama.gateway.endpoints import peer_policy

    class Fake:
        roles = {A: "serve", B: "admin"}

        def role(self, peer):
            return self.roles.get(peer)

    fake = Fake()
    allow = peer_policy(fake)
    assert allow(A, "POST", "/api/chat") and not allow(A, "DELETE", "/api/delete")
    assert allow(B, "DELETE", "/api/delete") and not allow(B, "GET", "/api/delete")
    fake.roles = {}  # revoked
    assert not allow(A, "POST", "/api/chat") and not allow(B, "DELETE", "/api/delete")
    open_mesh = peer_policy(None)
    assert open_mesh(A, "POST", "/api/chat") and not open_mesh(A, "DELETE", "/api/delete")
