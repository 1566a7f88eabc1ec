"""The Host allow-list against DNS rebinding: Ollama's rules (a table) and the gate over HTTP."""

from __future__ import annotations

import httpx
import pytest
import trio

from meshollama.gateway.hosts import HostPolicy, bind_is_loopback, split_host

from .fakes import make_config, running_gateway
from .test_roles import _mesh


def policy(*extra: str, loopback: bool = True) -> HostPolicy:
    return HostPolicy(loopback=loopback, extra=extra, hostname="MyBox",
                      addresses=lambda: frozenset({"203.0.113.7", "2001:db8::7"}))


ALLOWED = [None, "", "localhost", "localhost:11434", "LOCALHOST", "localhost.", "mybox", "mybox:8080",
           "app.localhost", "printer.local:631", "host.docker.internal", "127.0.0.1:11434", "127.8.9.1",
           "[::1]:11434", "::1", "0.0.0.0", "[::]", "10.1.2.3", "172.16.0.1", "192.168.1.5:80", "[fd00::1]",
           "203.0.113.7", "[2001:db8::7]:1", "[::ffff:127.0.0.1]"]
REFUSED = ["evil.example", "evil.example:11434", "localhost.evil.example", "mybox.evil", "8.8.8.8",
           "172.32.0.1", "[2001:db8::8]", "local", "evil-localhost", "169.254.169.254", "100.64.0.1"]


@pytest.mark.parametrize("host", ALLOWED)
def test_local_names_are_allowed(host):
    assert policy().allowed(host)


@pytest.mark.parametrize("host", REFUSED)
def test_other_names_are_refused_on_loopback(host):
    assert not policy().allowed(host)


def test_configured_names():
    p = policy("api.example.com", "*.corp.example", "gw:8080")
    assert p.allowed("api.example.com:443") and p.allowed("x.corp.example") and p.allowed("a.b.corp.example")
    assert p.allowed("gw:11434")  # a configured port does not matter, the name does
    assert not p.allowed("corp.example") and not p.allowed("evilcorp.example") and not p.allowed("example.com")
    assert policy("*").allowed("evil.example")


def test_other_binds_check_only_configured_names():
    assert policy(loopback=False).allowed("evil.example")
    strict = policy("api.example.com", loopback=False)
    assert strict.allowed("api.example.com") and strict.allowed("localhost") and not strict.allowed("evil.example")


def test_binds_and_split():
    assert bind_is_loopback("127.0.0.1:11434") and bind_is_loopback("[::1]:0") and bind_is_loopback("localhost:1")
    assert not bind_is_loopback("0.0.0.0:11434") and not bind_is_loopback("[::]:1")
    assert not bind_is_loopback("192.168.1.2:1") and not bind_is_loopback("example.com:1")
    assert split_host("[::1]:80") == "::1" and split_host("Example.COM.:1") == "example.com"
    assert HostPolicy.for_config(make_config(listen="0.0.0.0:11434").gateway).off
    assert not HostPolicy.for_config(make_config().gateway).off


async def test_rebinding_is_refused_over_http():
    mesh, _ = _mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for path in ("/api/tags", "/v1/models", "/api/generate", "/"):
                r = await client.get(path, headers={"host": "evil.example"})
                assert r.status_code == 403, path
            assert "allowed_hosts" in r.json()["error"]
            r = await client.get("/v1/models", headers={"host": "evil.example:11434"})
            assert r.json()["error"]["type"] == "api_error"  # the OpenAI envelope on /v1
            # A rebound page posting "same-origin": Origin matches Host, CORS lets it by; Host does not.
            r = await client.post("/api/generate", headers={"host": "evil.example", "origin": "http://evil.example"},
                                  json={"model": "llama3"})
            assert r.status_code == 403
            assert (await client.get("/api/tags", headers={"host": "localhost:11434"})).status_code == 200
            assert (await client.get("/api/tags")).status_code == 200  # httpx sends 127.0.0.1:<port>
            assert gw.metric("meshollama_api_refused_total", reason="host") == 6
    assert mesh.upstreams["peer-a"].requests == []


async def test_allowed_hosts_config_over_http():
    mesh, _ = _mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh, allowed_hosts=("*.example.com",)) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.get("/api/tags", headers={"host": "ai.example.com"})).status_code == 200
            assert (await client.get("/api/tags", headers={"host": "evil.example"})).status_code == 403
