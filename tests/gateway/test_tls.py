"""TLS and mutual TLS on the gateway, with a throwaway CA, and the real ollama and openai clients."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry

from meshollama.errors import ConfigError
from meshollama.gateway import create_app, serve_gateway
from meshollama.gateway.keystore import create
from meshollama.gateway.server import (
    TlsFiles,
    check_tls,
    hypercorn_config,
    tls_from_config,
)

from .fakes import make_config
from .test_roles import _mesh


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "other", "stranger")}
    ca = _cert("test ca", keys["ca"], "test ca", keys["ca"], ca=True)
    ca_path, _ = _write(d / "ca", ca, keys["ca"])
    server = _write(d / "server", _cert("localhost", keys["server"], "test ca", keys["ca"], server=True),
                    keys["server"])
    client = _write(d / "client", _cert("laptop", keys["client"], "test ca", keys["ca"]), keys["client"])
    stranger = _write(d / "stranger", _cert("stranger", keys["stranger"], "other ca", keys["other"]),
                      keys["stranger"])
    return Pki(ca_path, *server, *client, *stranger)


@asynccontextmanager
async def tls_gateway(pki: Pki, data_dir: Path, *, mtls: bool = False):
    gateway = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    if mtls:
        gateway["tls_client_ca"] = pki.ca
    config = make_config(data_dir=data_dir, **gateway)
    mesh, local = _mesh()
    app = create_app(config, mesh, local, CollectorRegistry())
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve_gateway, app, config.gateway.listen, grace_period=1.0,
                                            tls=tls_from_config(config.gateway)))
        yield f"https://{bound}", mesh
        nursery.cancel_scope.cancel()


def in_thread(fn):
    return trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def test_ollama_and_openai_clients_over_tls(pki, tmp_path):
    key, _ = create(tmp_path / "api_keys.json", "user", "laptop")
    ca = str(pki.ca)
    with trio.fail_after(30):
        async with tls_gateway(pki, tmp_path) as (url, mesh):
            def with_ollama():
                client = ollama.Client(host=url, verify=ca, headers={"Authorization": f"Bearer {key}"}, timeout=10)
                names = [m.model for m in client.list().models]
                return names, client.generate(model="llama3", prompt="hi").response

            names, text = await in_thread(with_ollama)
            assert names == ["llama3:latest"] and text == "Hello"

            def with_openai():
                with httpx.Client(verify=ca, timeout=10) as http:
                    client = openai.OpenAI(base_url=url + "/v1", api_key=key, http_client=http, max_retries=0)
                    reply = client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "x"}])
                    try:
                        openai.OpenAI(base_url=url + "/v1", api_key="wrong", http_client=http,
                                      max_retries=0).models.list()
                    except openai.AuthenticationError:
                        return reply.choices[0].message.content, True
                    return reply.choices[0].message.content, False

            assert await in_thread(with_openai) == ("Hello", True)

            def untrusted():  # the system CAs do not know our test CA
                with httpx.Client(timeout=10) as http:
                    http.get(url + "/")

            with pytest.raises(httpx.ConnectError):
                await in_thread(untrusted)
            async with httpx.AsyncClient(base_url=url.replace("https:", "http:"), timeout=10) as plain:
                with pytest.raises(httpx.TransportError):  # plain HTTP to a TLS port gets no answer
                    await plain.get("/")
    assert all("authorization" not in {k.lower() for k, _ in q.headers} for q in mesh.upstreams["peer-a"].requests)


def _context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def test_mutual_tls(pki, tmp_path):
    with trio.fail_after(30):
        async with tls_gateway(pki, tmp_path, mtls=True) as (url, _):
            for ctx in (_context(pki), _context(pki, pki.stranger_cert, pki.stranger_key)):
                async with httpx.AsyncClient(verify=ctx, timeout=10) as client:
                    with pytest.raises(httpx.TransportError):  # no certificate, or one from another CA
                        await client.get(url + "/api/version")
            async with httpx.AsyncClient(verify=_context(pki, pki.client_cert, pki.client_key), timeout=10) as client:
                r = await client.get(url + "/api/version")
                assert r.status_code == 200 and "version" in r.json()

            def with_ollama():
                client = ollama.Client(host=url, verify=_context(pki, pki.client_cert, pki.client_key), timeout=10)
                return client.generate(model="llama3", prompt="x").response

            assert await in_thread(with_ollama) == "Hello"


def test_hypercorn_tls_settings(pki):
    plain = hypercorn_config("127.0.0.1:0")
    assert not plain.ssl_enabled
    config = hypercorn_config("127.0.0.1:0", tls=TlsFiles(pki.server_cert, pki.server_key, pki.ca))
    assert config.ssl_enabled and config.verify_mode == ssl.CERT_REQUIRED and config.ca_certs == str(pki.ca)
    assert config.alpn_protocols == ["http/1.1"]
    assert hypercorn_config("127.0.0.1:0", tls=TlsFiles(pki.server_cert, pki.server_key)).verify_mode is None
    assert tls_from_config(make_config().gateway) is None


def test_bad_tls_files_are_config_errors(pki, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_tls(TlsFiles(pki.server_cert, pki.client_key))  # a key that does not match
    assert err.value.key == "gateway.tls_cert"
    with pytest.raises(ConfigError) as err:
        check_tls(TlsFiles(tmp_path / "missing.crt", pki.server_key))
    assert err.value.key == "gateway.tls_cert"
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError) as err:
        check_tls(TlsFiles(pki.server_cert, pki.server_key, tmp_path / "junk.pem"))
    assert err.value.key == "gateway.tls_client_ca"
    check_tls(TlsFiles(pki.server_cert, pki.server_key, pki.ca))


async def test_serve_gateway_refuses_bad_tls_before_binding(pki, tmp_path):
    config = make_config(data_dir=tmp_path)
    mesh, _ = _mesh()
    app = create_app(config, mesh, None, CollectorRegistry())
    with trio.fail_after(10):
        with pytest.raises(ConfigError):
            await serve_gateway(app, "127.0.0.1:0", tls=TlsFiles(pki.server_cert, pki.client_key))
