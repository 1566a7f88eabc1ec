"""The key file, the key store, ``meshollama keys``, and API keys over HTTP."""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import stat

import httpx
import pytest
import trio

from meshollama import cli_keys
from meshollama.gateway import keystore
from meshollama.gateway.auth import Authenticator, Caller, Refusal
from meshollama.gateway.keystore import (
    KeyFileError,
    KeyStore,
    create,
    key_id,
    new_key,
    read_file,
    revoke,
)
from meshollama.gateway.roles import Role

from .fakes import running_gateway
from .test_roles import _mesh, bearer


def test_new_key_shape_and_entry():
    plaintext, entry = new_key("user", "ci", created="2026-01-01T00:00:00Z")
    prefix, ident, secret = plaintext.split("_", 2)
    assert prefix == "mo" and len(ident) == 8 and len(secret) == 43 and key_id(plaintext) == ident
    assert entry == {"id": ident, "name": "ci", "role": "user", "created": "2026-01-01T00:00:00Z",
                     "sha256": keystore.digest(plaintext).hex()}
    assert plaintext not in json.dumps(entry)
    assert key_id("mo_0123abcd_short") is None and new_key(Role.ADMIN)[1]["created"].endswith("Z")
    with pytest.raises(ValueError):
        new_key("root")


def test_file_create_list_revoke(tmp_path):
    path = tmp_path / "api_keys.json"
    assert read_file(path) is None
    k1, e1 = create(path, "user", "a")
    k2, e2 = create(path, "admin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [e.id for e in read_file(path)] == [e1.id, e2.id]
    assert k1 not in path.read_text() and k2 not in path.read_text()
    assert revoke(path, e1.id) == e1 and revoke(path, e1.id) is None
    assert read_file(path) == [e2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_keys.json", "api_keys.json.lock"]  # no temp files


def test_a_bad_file_is_an_error(tmp_path):
    path = tmp_path / "api_keys.json"
    for text in ("{", "[]", '{"keys": [{"id": "xyz"}]}',
                 '{"keys": [{"id": "0123abcd", "role": "root", "sha256": "' + "0" * 64 + '"}]}'):
        path.write_text(text)
        with pytest.raises(KeyFileError):
            read_file(path)


def test_store_sources_and_open_or_closed(tmp_path):
    path = tmp_path / "api_keys.json"
    assert not KeyStore(path).configured and not KeyStore(None).configured
    path.write_text('{"keys": []}')
    store = KeyStore(path)
    assert store.configured and store.entries() == ()  # an empty file closes the gateway: fail closed
    assert KeyStore(None, ["legacy"]).match("legacy").role is Role.ADMIN


def test_shared_keys(caplog):
    store = KeyStore(None)
    plaintext, entry = new_key("readonly", "team")
    bad = dict(entry, role="superuser")
    assert store.set_shared([entry, bad, {"id": "nope"}]) == 1
    assert "skipped" in caplog.text and store.configured
    found = store.match(plaintext)
    assert found.source == "shared" and found.role is Role.READONLY
    assert Authenticator(store).authenticate(f"Bearer {plaintext}", 0) == Caller(Role.READONLY, "shared",
                                                                                 entry["id"], "team")
    other, named = new_key("user")
    assert store.set_shared([dict(named, id="team-key.1")]) == 1 and store.match(other).id == "team-key.1"
    store.set_shared([])
    assert store.match(plaintext) is None and not store.configured


def test_match_compares_every_candidate(monkeypatch):
    keys = [new_key("user")[0] for _ in range(3)]
    store = KeyStore(None, keys)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(keystore.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert store.match(keys[0]) is not None and len(calls) == 3  # the first matched; all three compared
    assert store.match("nope") is None and len(calls) == 6


def test_reload_at_most_once_per_recheck(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meshollama.audit")
    path = tmp_path / "api_keys.json"
    plaintext, entry = create(path, "user")
    store = KeyStore(path, recheck=1.0)
    auth = Authenticator(store)
    assert isinstance(auth.authenticate(f"Bearer {plaintext}", 100.0), Caller)
    revoke(path, entry.id)
    assert isinstance(auth.authenticate(f"Bearer {plaintext}", 100.5), Caller)  # not looked at yet
    assert isinstance(auth.authenticate(f"Bearer {plaintext}", 101.0), Refusal)
    new, new_entry = create(path, "admin")
    assert auth.authenticate(f"Bearer {new}", 101.2).status == 401
    assert auth.authenticate(f"Bearer {new}", 102.1).role is Role.ADMIN
    assert f"removed={entry.id}" in caplog.text and f"added={new_entry.id}" in caplog.text


def test_a_corrupt_file_closes_the_gateway(tmp_path, caplog):
    path = tmp_path / "api_keys.json"
    plaintext, _ = create(path, "user")
    store = KeyStore(path, recheck=0)
    path.write_text("{ not json")
    store.refresh(1.0)
    assert store.configured and store.match(plaintext) is None and "refusing every key" in caplog.text
    path.unlink()
    store.refresh(2.0)
    assert not store.configured


# --- meshollama keys ------------------------------------------------------------------


def keys_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_keys.add_parser(parser.add_subparsers(dest="command"))
    return cli_keys.run(parser.parse_args(["keys", *argv]))


def test_cli_create_list_revoke(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.delenv("MESHOLLAMA_CONFIG", raising=False)
    caplog.set_level(logging.INFO, logger="meshollama.audit")
    d = str(tmp_path)
    assert keys_cli("list", "--data-dir", d) == 0
    assert "no key file" in capsys.readouterr().err
    assert keys_cli("create", "--role", "user", "--name", "ci-bot", "--data-dir", d) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    ident = key_id(key)
    assert ident and "shown only this once" in err and "now requires an API key" in err
    assert keys_cli("list", "--data-dir", d) == 0
    out = capsys.readouterr().out
    assert ident in out and "ci-bot" in out and "user" in out and key not in out
    assert keys_cli("list", "--json", "--data-dir", d) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(row) == {"id", "name", "role", "created"}
    assert keys_cli("create", "--role", "user", "--name", "two words", "--data-dir", d) == 2
    assert keys_cli("revoke", "ffffffff", "--data-dir", d) == 1
    assert keys_cli("revoke", ident, "--data-dir", d) == 0
    assert read_file(tmp_path / "api_keys.json") == []
    audit = [r.getMessage() for r in caplog.records if r.name == "meshollama.audit"]
    assert audit[0].startswith(f"key created id={ident} name=ci-bot role=user by=")
    assert audit[1].startswith(f"key revoked id={ident}")
    with pytest.raises(SystemExit):
        keys_cli("create", "--role", "root", "--data-dir", d)


# --- over HTTP ----------------------------------------------------------------------


async def test_missing_wrong_and_revoked_keys(tmp_path):
    path = tmp_path / "api_keys.json"
    key, entry = create(path, "user", "ci")
    mesh, _ = _mesh()
    body = {"model": "llama3", "prompt": "x", "stream": False}
    with trio.fail_after(10):
        async with running_gateway(mesh, data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            gw.app.extensions["meshollama"].keystore.recheck = 0  # look at the file on every request
            altered = key[:-1] + ("A" if key[-1] != "A" else "B")
            for headers in ({}, bearer("mo_00000000_" + "A" * 43), bearer(altered), {"authorization": key},
                            {"authorization": f"Basic {key}"}, bearer(entry.sha256.hex())):
                r = await client.post("/api/generate", headers=headers, json=body)
                assert (r.status_code, r.json()) == (401, {"error": "unauthorized"}), headers
                assert r.headers["www-authenticate"] == "Bearer"
            r = await client.get("/v1/models", headers=bearer("wrong"))
            assert r.status_code == 401 and r.json()["error"]["message"] == "unauthorized"
            assert (await client.get("/metrics")).status_code == 200  # still exempt
            r = await client.post("/api/generate", headers=bearer(key), json=body)
            assert r.status_code == 200
            later, _ = create(path, "readonly")  # the node sees new keys without a restart
            assert (await client.get("/api/tags", headers=bearer(later))).status_code == 200
            revoke(path, entry.id)  # and revoked ones
            assert (await client.post("/api/generate", headers=bearer(key), json=body)).status_code == 401
            assert gw.metric("meshollama_api_refused_total", reason="unauthenticated") == 8
    (req,) = mesh.upstreams["peer-a"].requests
    assert all(k.lower() != "authorization" for k, _ in req.headers)  # the key never travelled on


async def test_legacy_config_keys_are_admins(tmp_path):
    mesh, local = _mesh()
    with trio.fail_after(10):
        async with running_gateway(mesh, local, api_keys=("old-key",), data_dir=tmp_path) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/pull", headers=bearer("old-key"), json={"model": "m", "stream": False})
            assert r.status_code == 200
            assert gw.metric("meshollama_api_requests_by_key_total", key="config-1", role="admin") == 1
    assert "authorization" not in {k.lower() for k, _ in local.requests[0].headers}
