"""Bearer JWTs: the verifier (genuine, forged, expired, foreign) and the gate over HTTP."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time

import httpx
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from meshollama.errors import ConfigError
from meshollama.gateway.auth import Authenticator, Caller, Refusal
from meshollama.gateway.jwt_auth import JwtVerifier, algorithms_for
from meshollama.gateway.keystore import KeyStore, create
from meshollama.gateway.roles import Role

from .fakes import make_config, running_gateway
from .test_roles import _mesh, bearer

SECRET = b"0123456789abcdef0123456789abcdef0123456789abcdef-hs256"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


def pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**kw) -> dict:
    out = {"sub": "alice", "role": "user", "exp": int(time.time()) + 600}
    out.update(kw)
    return {k: v for k, v in out.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict, alg: str = "none") -> str:
    return f"{b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}."


def hs256_with(secret: bytes, payload: dict) -> str:
    """HS256 by hand: PyJWT refuses to use a PEM public key as an HMAC secret, an attacker does not."""
    head = unsigned(payload, "HS256")[:-1]
    return head + "." + b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())


def verifier(tmp_path, **gateway) -> Authenticator:
    cfg = make_config(**gateway).gateway
    return Authenticator(KeyStore(None), JwtVerifier.from_config(cfg))


def hs_auth(tmp_path, **gateway) -> Authenticator:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    return verifier(tmp_path, jwt_secret_file=tmp_path / "secret", **gateway)


def check(auth: Authenticator, token: str):
    return auth.authenticate(f"Bearer {token}", 0)


def test_hs256_genuine_forged_expired(tmp_path):
    auth = hs_auth(tmp_path)
    assert auth.configured
    assert check(auth, jwt.encode(claims(), SECRET, "HS256")) == Caller(Role.USER, "jwt", "alice")
    refused = [
        jwt.encode(claims(exp=int(time.time()) - 120), SECRET, "HS256"),  # expired, past the leeway
        jwt.encode(claims(exp=None), SECRET, "HS256"),  # no exp at all
        jwt.encode(claims(), SECRET + b"x", "HS256"),  # wrong secret
        jwt.encode(claims(), SECRET, "HS384"),  # an algorithm the key was not configured for
        unsigned(claims()),  # alg: none
        unsigned(claims(), "HS256"),  # no signature
        jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, "HS256"),  # not yet valid
        "a.b.c",
    ]
    for token in refused:
        result = check(auth, token)
        assert isinstance(result, Refusal) and (result.status, result.message) == (401, "unauthorized"), token


def test_roles_from_claims(tmp_path):
    auth = hs_auth(tmp_path)
    assert check(auth, jwt.encode(claims(role="ADMIN"), SECRET, "HS256")).role is Role.ADMIN
    assert check(auth, jwt.encode(claims(role=["offline", "readonly", "user"]), SECRET, "HS256")).role is Role.USER
    for bad in (None, "root", ["root"], 3, {"x": 1}):
        result = check(auth, jwt.encode(claims(role=bad), SECRET, "HS256"))
        assert isinstance(result, Refusal) and result.status == 403 and result.reason == "no_role", bad
        assert result.who == "jwt:alice"
    nested = hs_auth(tmp_path, jwt_role_claim="realm.role")
    assert check(nested, jwt.encode(claims(realm={"role": "readonly"}), SECRET, "HS256")).role is Role.READONLY
    assert check(nested, jwt.encode(claims(**{"realm.role": "admin"}), SECRET, "HS256")).role is Role.ADMIN


def test_audience_and_issuer(tmp_path):
    auth = hs_auth(tmp_path, jwt_audience="meshollama", jwt_issuer="https://idp.example")
    good = claims(aud="meshollama", iss="https://idp.example")
    assert isinstance(check(auth, jwt.encode(good, SECRET, "HS256")), Caller)
    for bad in (dict(good, aud="other"), dict(good, iss="https://evil.example"), claims(iss="https://idp.example"),
                claims(aud="meshollama")):
        assert check(auth, jwt.encode(bad, SECRET, "HS256")).status == 401, bad
    # Not configured: not checked, whatever the token says.
    assert isinstance(check(hs_auth(tmp_path), jwt.encode(claims(aud="x", iss="y"), SECRET, "HS256")), Caller)


def test_public_keys(tmp_path, rsa_key, ed_key):
    (tmp_path / "rsa.pem").write_bytes(pem(rsa_key.public_key()))
    auth = verifier(tmp_path, jwt_public_key_file=tmp_path / "rsa.pem")
    assert check(auth, jwt.encode(claims(), rsa_key, "RS256")).role is Role.USER
    assert check(auth, jwt.encode(claims(), rsa_key, "PS256")).role is Role.USER
    # The classic confusion attack: HS256 "signed" with the public key as the secret.
    assert check(auth, hs256_with(pem(rsa_key.public_key()), claims())).status == 401
    assert check(auth, unsigned(claims())).status == 401
    assert check(auth, jwt.encode(claims(), ed_key, "EdDSA")).status == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert check(auth, jwt.encode(claims(), other, "RS256")).status == 401

    (tmp_path / "ed.pem").write_bytes(pem(ed_key.public_key()))
    auth = verifier(tmp_path, jwt_public_key_file=tmp_path / "ed.pem")
    assert check(auth, jwt.encode(claims(role="readonly"), ed_key, "EdDSA")).role is Role.READONLY
    assert check(auth, jwt.encode(claims(), rsa_key, "RS256")).status == 401
    assert check(auth, hs256_with(pem(ed_key.public_key()), claims())).status == 401


def test_algorithms_follow_the_key(ed_key, rsa_key):
    assert algorithms_for(ed_key.public_key()) == ("EdDSA",)
    assert "HS256" not in algorithms_for(rsa_key.public_key()) and "none" not in algorithms_for(rsa_key.public_key())
    assert algorithms_for(ec.generate_private_key(ec.SECP384R1()).public_key()) == ("ES384",)


def test_certificate_as_key_file(tmp_path, ed_key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ed_key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ed_key, None))
    (tmp_path / "idp.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    auth = verifier(tmp_path, jwt_public_key_file=tmp_path / "idp.crt")
    assert check(auth, jwt.encode(claims(), ed_key, "EdDSA")).role is Role.USER


def test_config_errors(tmp_path):
    (tmp_path / "short").write_bytes(b"too-short\n")
    with pytest.raises(ConfigError, match="at least 32 bytes") as err:
        verifier(tmp_path, jwt_secret_file=tmp_path / "short")
    assert err.value.key == "gateway.jwt_secret_file"
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError) as err:
        verifier(tmp_path, jwt_public_key_file=tmp_path / "bad.pem")
    assert err.value.key == "gateway.jwt_public_key_file"
    with pytest.raises(ConfigError, match="cannot read"):
        verifier(tmp_path, jwt_public_key_file=tmp_path / "missing.pem")
    assert JwtVerifier.from_config(make_config().gateway) is None


async def test_jwts_over_http(tmp_path, ed_key):
    (tmp_path / "ed.pem").write_bytes(pem(ed_key.public_key()))
    key, _ = create(tmp_path / "api_keys.json", "readonly")  # keys and JWTs together
    mesh, local = _mesh()
    body = {"model": "llama3", "prompt": "x", "stream": False}
    user = jwt.encode(claims(), ed_key, "EdDSA")
    with trio.fail_after(10):
        async with running_gateway(mesh, local, data_dir=tmp_path, jwt_public_key_file=tmp_path / "ed.pem",
                                   jwt_audience="mesh") as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/generate", headers=bearer(jwt.encode(claims(aud="mesh"), ed_key, "EdDSA")),
                                  json=body)
            assert r.status_code == 200
            assert (await client.post("/api/generate", headers=bearer(user), json=body)).status_code == 401  # no aud
            expired = jwt.encode(claims(aud="mesh", exp=int(time.time()) - 300), ed_key, "EdDSA")
            r = await client.post("/v1/chat/completions", headers=bearer(expired), json={"model": "llama3"})
            assert r.status_code == 401 and r.json()["error"]["message"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            r = await client.post("/api/generate", headers=bearer(unsigned(claims(aud="mesh", role="admin"))),
                                  json=body)
            assert r.status_code == 401
            no_role = jwt.encode(claims(aud="mesh", role="root"), ed_key, "EdDSA")
            r = await client.get("/api/tags", headers=bearer(no_role))
            assert r.status_code == 403 and "names no role" in r.json()["error"]
            r = await client.post("/api/pull", headers=bearer(jwt.encode(claims(aud="mesh"), ed_key, "EdDSA")),
                                  json={"model": "m"})
            assert r.status_code == 403
            assert (await client.get("/api/tags", headers=bearer(key))).status_code == 200
            assert gw.metric("meshollama_api_requests_by_key_total", key="jwt", role="user") == 1
    (req,) = mesh.upstreams["peer-a"].requests
    assert "authorization" not in {k.lower() for k, _ in req.headers}
    assert local.requests == []
