"""Zero trust as users run it: ``meshollama start`` processes on loopback.

* A client's ``Authorization`` and ``Cookie`` stop at the gateway it called:
  neither the serving peer nor its Ollama ever sees them.
* The gateway over TLS (a self-signed certificate, given to the clients as
  their CA) with the real ``ollama`` and ``openai`` clients, and the CLI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from functools import partial

import httpx
import pytest
import trio

from tests.fakes.fake_ollama import serve_fake

from .cluster import cluster

pytestmark = pytest.mark.slow


async def test_credentials_never_reach_another_peer_or_its_backend(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fake = await fn.start(partial(serve_fake, ["secretive:latest"], name="b"))
            a = await c.start("a", "--backend", "none")
            await c.start("b", "--backend", "ollama", "--ollama-url", fake.url, bootstrap=a)

            async def routable():
                return any(m["name"].startswith("secretive") for p in await c.peers(a) for m in p.get("models", []))

            await c.wait_until(routable)
            r = await c.client.post(a.api + "/api/chat", json={"model": "secretive", "stream": False,
                                                               "messages": [{"role": "user", "content": "hi"}]},
                                    headers={"Authorization": "Bearer sk-the-users-real-key",
                                             "Cookie": "session=abc", "X-Meshollama-Peer": "forged",
                                             # not a credential of ours: the gateway passes it, the peer hop drops it
                                             "X-Api-Key": "sk-ant-the-users-key"})
            assert r.status_code == 200, r.text
            chats = [q for q in fake.requests if q.path == "/api/chat"]
            assert chats, "the chat reached b's Ollama"
            for q in chats:
                names = {k.lower() for k, _ in q.headers}
                assert not names & {"authorization", "cookie", "x-meshollama-peer", "x-api-key"}, q.headers
                assert b"sk-the-users-real-key" not in q.body
            fn.cancel_scope.cancel()


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshollama test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "gw.crt", tmp_path / "gw.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_a_node_serves_tls_to_the_ollama_and_openai_clients_and_the_cli(tmp_path):
    import ollama
    import openai

    cert, key = _self_signed(tmp_path)
    env = {"MESHOLLAMA_GATEWAY_TLS_CERT": str(cert), "MESHOLLAMA_GATEWAY_TLS_KEY": str(key)}
    with trio.fail_after(60):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fake = await fn.start(partial(serve_fake, ["tiny:latest"], name="t"))
            node = await c.start("t", "--backend", "ollama", "--ollama-url", fake.url, env=env)
            assert node.api.startswith("https://"), node.info

            def clients():
                o = ollama.Client(host=node.api, verify=str(cert))
                said = o.chat(model="tiny", messages=[{"role": "user", "content": "hi"}])
                oa = openai.OpenAI(base_url=node.api + "/v1", api_key="unused",
                                   http_client=httpx.Client(verify=str(cert)))
                done = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
                with pytest.raises(httpx.ConnectError):  # without the CA: refused
                    httpx.get(node.api + "/api/version", timeout=5)
                return said.message.content, done.choices[0].message.content

            chat, completion = await trio.to_thread.run_sync(clients)
            assert chat and completion
            r = await trio.run_process([sys.executable, "-m", "meshollama", "status", "--data-dir", str(node.data_dir)],
                                       capture_stdout=True, capture_stderr=True, check=False,
                                       env={**__import__("os").environ, **env})
            assert r.returncode == 0, r.stderr.decode()
            assert node.peer_id in r.stdout.decode()
            fn.cancel_scope.cancel()
