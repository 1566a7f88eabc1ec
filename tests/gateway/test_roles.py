"""Roles: which role each request needs (a table), and the gate enforcing it over HTTP."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from meshollama.gateway.auth import ANONYMOUS, Caller, audit_message, authorize
from meshollama.gateway.endpoints import ENDPOINTS
from meshollama.gateway.keystore import new_key
from meshollama.gateway.roles import Role, required_role

from .fakes import FakeMesh, FakeUpstream, model, ollama_like, running_gateway

A, U, R = Role.ADMIN, Role.USER, Role.READONLY

CASES = [
    # exempt
    ("GET", "/", None), ("HEAD", "/", None), ("GET", "/metrics", None), ("HEAD", "/metrics", None),
    ("POST", "/", U), ("POST", "/metrics", U),
    ("GET", "/healthz", None), ("HEAD", "/readyz", None), ("POST", "/healthz", U), ("GET", "/healthz/x", U),
    # the panel's static files; its data comes from /api/mesh/* with the user's credential
    ("GET", "/ui", None), ("GET", "/ui/", None), ("GET", "/ui/panel.js", None), ("HEAD", "/ui/panel.css", None),
    ("POST", "/ui/", U), ("GET", "/uix", U), ("GET", "/ui.js", U),
    # listings
    ("GET", "/api/tags", R), ("HEAD", "/api/tags", R), ("GET", "/api/ps", R), ("GET", "/api/version", R),
    ("GET", "/v1/models", R), ("GET", "/v1/models/llama3", R), ("POST", "/api/show", R),
    ("GET", "/api/mesh/peers", R), ("GET", "/api/mesh/status", R), ("GET", "/api/mesh/policy", R),
    # inference
    ("POST", "/api/generate", U), ("POST", "/api/chat", U), ("POST", "/api/embed", U),
    ("POST", "/api/embeddings", U), ("POST", "/v1/chat/completions", U), ("POST", "/v1/completions", U),
    ("POST", "/v1/embeddings", U), ("POST", "/v1/responses", U), ("POST", "/v1/messages", U),
    ("POST", "/api/tags", U), ("DELETE", "/v1/models/llama3", U), ("GET", "/api/show", U),
    # management and mesh changes
    ("POST", "/api/pull", A), ("POST", "/api/push", A), ("POST", "/api/create", A), ("POST", "/api/copy", A),
    ("DELETE", "/api/delete", A), ("GET", "/api/delete", A), ("HEAD", "/api/blobs/sha256:abc", A),
    ("POST", "/api/blobs/sha256:abc", A), ("POST", "/api/mesh/policy", A), ("POST", "/api/mesh/drain", A),
    ("DELETE", "/api/mesh/keys/x", A),
    ("PUT", "/api/mesh/anything", A),
    # unknown paths: user (they answer 404)
    ("GET", "/nope", U), ("POST", "/api/pull/", U), ("POST", "/API/PULL", U), ("GET", "/api/mesh", U),
]


@pytest.mark.parametrize(("method", "path", "role"), CASES)
def test_required_role(method, path, role):
    assert required_role(method, path) == role
    assert required_role(method.lower(), path) == role


def test_every_endpoint_is_classified_by_its_routing():
    for e in ENDPOINTS:
        path = e.path + "sha256:x" if e.prefix else e.path
        for method in e.methods:
            expected = A if not e.routed else (R if path == "/api/show" else U)
            assert required_role(method, path) == expected, (method, path)


def test_roles_are_ordered_and_parsed():
    assert R < U < A and str(A) == "admin"
    assert Role.parse(" Admin ") is A and Role.parse("root") is None and Role.parse(3) is None


def test_authorize():
    user = Caller(U, "key", "0123abcd", "ci")
    assert authorize(user, U, "POST", "/api/chat") is None and authorize(user, R, "GET", "/api/tags") is None
    refusal = authorize(user, A, "POST", "/api/pull")
    assert refusal.status == 403 and "admin" in refusal.message and not refusal.challenge
    assert authorize(ANONYMOUS, A, "POST", "/api/pull") is None  # an open gateway: everyone is admin
    assert user.label == "ci" and user.who == "key:0123abcd(ci)"
    assert Caller(U, "jwt", "alice").label == "jwt" and Caller(U, "jwt", "alice").who == "jwt:alice"


def test_audit_lines_cannot_be_forged():
    line = audit_message("key:1(a b)", "127.0.0.1:5", "POST", "/api/pull\nwho=admin", 200)
    assert "\n" not in line and line.startswith('who="key:1(a b)" client=127.0.0.1:5 method=POST path="/api')
    assert line.endswith("status=200") and audit_message("x", "-", "GET", "/", None).endswith("status=-")


# --- over HTTP ---------------------------------------------------------------------


def _keys(data_dir) -> dict[Role, str]:
    """One key per role, written to ``data_dir``'s key file."""
    import json

    out, entries = {}, []
    for role in Role:
        plaintext, entry = new_key(role, f"{role}-key")
        out[role], entries = plaintext, entries + [entry]
    (data_dir / "api_keys.json").write_text(json.dumps({"keys": entries}))
    return out


def _mesh() -> tuple[FakeMesh, FakeUpstream]:
    mesh = FakeMesh()
    mesh.add("peer-a", [model("llama3:latest")])
    return mesh, FakeUpstream("local", ollama_like)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_each_role_over_http(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meshollama.audit")
    keys = _keys(tmp_path)
    mesh, local = _mesh()
    gen = {"model": "llama3", "prompt": "x", "stream": False}
    with trio.fail_after(10):
        async with running_gateway(mesh, local, data_dir=tmp_path) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            ro, user, admin = bearer(keys[R]), bearer(keys[U]), bearer(keys[A])
            for h in (ro, user, admin):
                assert (await client.get("/api/tags", headers=h)).status_code == 200
                assert (await client.get("/api/mesh/peers", headers=h)).status_code == 200
            r = await client.post("/api/generate", headers=ro, json=gen)
            assert r.status_code == 403 and "user role" in r.json()["error"] and "www-authenticate" not in r.headers
            r = await client.post("/v1/chat/completions", headers=ro, json={"model": "llama3", "messages": []})
            assert r.status_code == 403 and r.json()["error"]["type"] == "api_error"  # the OpenAI envelope
            r = await client.post("/v1/messages", headers=ro, json={"model": "llama3"})
            assert r.json()["error"]["type"] == "permission_error"  # Anthropic's
            assert (await client.post("/api/generate", headers=user, json=gen)).status_code == 200
            assert (await client.post("/api/generate", headers=admin, json=gen)).status_code == 200
            r = await client.post("/api/pull", headers=user, json={"model": "llama3", "stream": False})
            assert r.status_code == 403
            r = await client.post("/api/pull", headers=admin, json={"model": "llama3", "stream": False})
            assert r.status_code == 200
            assert (await client.request("DELETE", "/api/delete", headers=ro, json={"model": "x"})).status_code == 403
            assert gw.metric("meshollama_api_requests_by_key_total", key="user-key", role="user") == 3
            assert gw.metric("meshollama_api_requests_by_key_total", key="readonly-key", role="readonly") == 2
            assert gw.metric("meshollama_api_refused_total", reason="forbidden") == 5
    assert [q.path for q in local.requests] == ["/api/pull"]  # refused requests never reached a backend
    lines = [r.getMessage() for r in caplog.records if r.name == "meshollama.audit"]
    admin_id = keys[A].split("_")[1]
    assert f"who=key:{admin_id}(admin-key) client=127.0.0.1:" in lines[1]
    assert lines[1].endswith("method=POST path=/api/pull status=200")
    assert lines[0].startswith("who=key:") and lines[0].endswith("path=/api/pull status=403")
    assert lines[2].endswith("method=DELETE path=/api/delete status=403") and len(lines) == 3


async def test_open_gateway_audits_anonymous_admin_actions(caplog):
    caplog.set_level(logging.INFO, logger="meshollama.audit")
    mesh, local = _mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh, local) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            assert (await client.post("/api/copy", json={"source": "a", "destination": "b"})).status_code == 200
            assert (await client.post("/api/generate", json={"model": "llama3", "stream": False})).status_code == 200
            assert gw.metric("meshollama_api_requests_by_key_total", key="anonymous", role="admin") == 2
    (line,) = [r.getMessage() for r in caplog.records if r.name == "meshollama.audit"]
    assert line.startswith("who=anonymous client=127.0.0.1:") and line.endswith("path=/api/copy status=200")
