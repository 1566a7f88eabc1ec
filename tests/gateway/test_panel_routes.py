"""The panel's routes: static files behind a whitelist, whoami, traffic and the event stream."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import pytest
import trio

from meshollama.gateway import keystore
from meshollama.gateway.auth import ANONYMOUS, Authenticator, Caller
from meshollama.gateway.panel_events import REAUTHENTICATE, REVOKED, ROLE_CHANGED, fingerprint, frame, whoami
from meshollama.gateway.panel_routes import ASSETS, CSP, credential_check, stream_owner
from meshollama.gateway.roles import Role
from meshollama.mesh.peertable import PeerState

from .fakes import FakeMesh, model, running_gateway
from .test_roles import _keys, bearer

A, U, R = Role.ADMIN, Role.USER, Role.READONLY
SECRETS = (b"[tool.setuptools", b"root:x:0", b"meshollama.panel", b"import ")


def _mesh() -> FakeMesh:
    mesh = FakeMesh()
    mesh.add("peer-self", [model("llama3:latest", loaded=True)])
    mesh.add("peer-b", [model("qwen:7b")])
    return mesh


def _fast(gw, *, tick: float = 0.05, heartbeat: float = 15.0) -> None:
    feeds = gw.app.extensions["meshollama"].panel_feeds
    feeds.tick, feeds.heartbeat = tick, heartbeat


class Events:
    """Reads an SSE body into (event, data) pairs, comments as ("#", text)."""

    def __init__(self, response: httpx.Response) -> None:
        self.chunks = response.aiter_text()
        self.buf = ""
        self.retry: int | None = None

    async def next(self) -> tuple[str, object]:
        while "\n\n" not in self.buf:
            self.buf += await self.chunks.__anext__()
        block, self.buf = self.buf.split("\n\n", 1)
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                return "#", line[1:].strip()
            name, _, value = line.partition(": ")
            if name == "retry":
                self.retry = int(value)
                return await self.next()
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        return event, json.loads("\n".join(data))

    async def until(self, wanted: str, predicate=lambda data: True) -> object:
        while True:
            event, data = await self.next()
            if event == wanted and predicate(data):
                return data


# --- static files ------------------------------------------------------------------------------


async def test_the_page_and_its_files_come_with_strict_headers():
    assert {"index.html", "panel.js", "panel.css", "favicon.svg", "sse.js"} <= set(ASSETS)
    with trio.fail_after(10):
        async with running_gateway(_mesh()) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.get("/ui")
            assert r.status_code == 308 and r.headers["location"] == "/ui/"
            r = await client.get("/ui/")
            assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
            assert b'<script type="module" src="panel.js">' in r.content
            assert r.headers["content-security-policy"] == CSP
            assert "frame-ancestors 'none'" in CSP and "script-src 'self';" in CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
            assert r.headers["cache-control"] == "no-cache"
            types = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8", "svg": "image/svg+xml",
                     "html": "text/html; charset=utf-8"}
            for name, asset in ASSETS.items():
                r = await client.get(f"/ui/{name}")
                assert r.status_code == 200 and r.content == asset.body
                assert r.headers["content-type"] == types[name.rsplit(".", 1)[1]]
                assert r.headers["content-security-policy"] == CSP
                again = await client.get(f"/ui/{name}", headers={"if-none-match": r.headers["etag"]})
                assert again.status_code == 304 and again.content == b""
            head = await client.head("/ui/panel.css")
            assert head.status_code == 200 and head.content == b""


async def test_the_page_has_no_inline_script_or_style():
    html = ASSETS["index.html"].body.decode()
    assert "<script>" not in html and "style=" not in html and "<style" not in html and " on" + "click=" not in html
    for name in ASSETS:
        assert name.rsplit(".", 1)[1] in ("html", "js", "css", "svg")
        assert b"http://" not in ASSETS[name].body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in ASSETS[name].body  # works offline: nothing from a CDN


async def _raw_get(host: str, port: int, target: str) -> bytes:
    """A request line sent as written: no client normalises ``..`` or ``%2e`` away."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


@pytest.mark.parametrize("target", [
    "/ui/../pyproject.toml", "/ui/../../pyproject.toml", "/ui/%2e%2e/pyproject.toml", "/ui/..%2fpyproject.toml",
    "/ui/%2E%2E%2F%2E%2E%2Fpyproject.toml", "/ui//etc/passwd", "/ui/%2Fetc%2Fpasswd", "/ui/static/index.html",
    "/ui/__init__.py", "/ui/index.html%00", "/ui/./index.html.bak", "/ui/..\\pyproject.toml", "/ui/INDEX.HTML",
    "/ui/%252e%252e/pyproject.toml",
])
async def test_only_the_shipped_files_are_served(target):
    with trio.fail_after(10):
        async with running_gateway(_mesh()) as gw:
            host, port = gw.url.removeprefix("http://").rsplit(":", 1)
            raw = await _raw_get(host, int(port), target)
    status = int(raw.split(b" ", 2)[1])
    assert status in (400, 404), raw[:200]
    assert not any(s in raw for s in SECRETS), raw[:400]


# --- who is calling, and the stream's credentials ------------------------------------------------


def test_whoami_never_holds_the_secret():
    assert whoami(ANONYMOUS) == {"role": "admin", "kind": "anonymous", "name": None}
    assert whoami(Caller(R, "key", "0123abcd", "dash")) == {"role": "readonly", "kind": "key", "name": "dash"}
    assert whoami(Caller(U, "jwt", "alice")) == {"role": "user", "kind": "jwt", "name": "alice"}
    assert whoami(None) == {"role": None, "kind": None, "name": None}


async def test_whoami_and_events_need_a_readonly_credential(tmp_path):
    keys = _keys(tmp_path)
    with trio.fail_after(15):
        async with running_gateway(_mesh(), data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            _fast(gw)
            for path in ("/api/mesh/whoami", "/api/mesh/events", "/api/mesh/traffic"):
                r = await client.get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert (await client.get(path, headers=bearer("wrong"))).status_code == 401
            for role, key in keys.items():
                r = await client.get("/api/mesh/whoami", headers=bearer(key))
                assert r.json() == {"role": str(role), "kind": "key", "name": f"{role}-key"}
                assert key not in r.text
            assert (await client.get("/ui/")).status_code == 200  # the page itself needs nothing
            async with client.stream("GET", "/api/mesh/events", headers=bearer(keys[R])) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert resp.headers["cache-control"] == "no-cache, no-transform"
                hello = await Events(resp).until("hello")
                assert hello["role"] == "readonly" and hello["open"] is False and hello["self_id"] == "peer-self"
            r = await client.post("/api/mesh/events", headers=bearer(keys[R]))
            assert r.status_code == 403  # a non-GET /api/mesh/ route needs admin (and is no route at all)


async def test_a_page_on_another_origin_cannot_read_the_events(tmp_path):
    keys = _keys(tmp_path)
    with trio.fail_after(10):
        async with running_gateway(_mesh(), data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for origin in ("http://evil.example", "null", "http://192.168.1.66:8080"):
                r = await client.get("/api/mesh/events", headers={**bearer(keys[A]), "origin": origin})
                assert r.status_code == 403 and r.content == b"" and "access-control-allow-origin" not in r.headers
                r = await client.options("/api/mesh/events", headers={
                    "origin": origin, "access-control-request-method": "GET",
                    "access-control-request-headers": "authorization"})
                assert r.status_code == 403
            same = gw.url  # the panel itself: its own origin is fine
            r = await client.get("/api/mesh/whoami", headers={**bearer(keys[R]), "origin": same})
            assert r.status_code == 200


# --- the event stream ------------------------------------------------------------------------------


async def test_events_come_at_once_then_on_change_without_a_reconnect():
    mesh = _mesh()
    with trio.fail_after(15):
        async with running_gateway(mesh) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            _fast(gw)
            async with client.stream("GET", "/api/mesh/events") as resp:
                events = Events(resp)
                first = [await events.next() for _ in range(4)]
                assert events.retry == 2000
                assert [e for e, _ in first] == ["hello", "mesh", "models", "traffic"]
                hello, peers, models, traffic = (d for _, d in first)
                assert hello == {"self_id": "peer-self", "version": hello["version"], "role": "admin",
                                 "kind": "anonymous", "name": None, "open": True, "heartbeat": 15.0}
                assert [p["peer_id"] for p in peers["peers"]] == ["peer-b", "peer-self"]
                assert peers["counts"]["alive"] == 2 and peers["self_id"] == "peer-self"
                assert {"in_flight", "capacity", "queued"} <= set(peers["peers"][0]["load"])
                assert [m["model"] for m in models["models"]] == ["llama3:latest", "qwen:7b"]
                assert models["models"][0]["holders"][0] | {"digest": ""} == {
                    "peer": "peer-self", "state": "alive", "self": True, "digest": "", "loaded": True}
                assert models["can_delete"] is False and models["can_replicate"] is False
                assert traffic["total"]["requests"] == 0 and traffic["recent"] == []

                mesh.add("peer-c", [model("phi3:mini")], state=PeerState.DOWN)
                changed = await events.until("mesh")
                assert [p["state"] for p in changed["peers"]] == ["alive", "down", "alive"]
                assert (await events.until("models"))["models"][1]["model"] == "phi3:mini"

                r = await client.post("/api/chat", json={"model": "qwen:7b", "messages": [], "stream": False})
                assert r.status_code == 200
                traffic = await events.until("traffic", lambda d: d["total"]["requests"] > 0)
                (last,) = traffic["recent"]
                assert last["peer"] == "peer-b" and last["model"] == "qwen:7b" and last["status"] == 200
                assert traffic["peers"]["peer-b"]["requests"] == 1 and "qwen:7b" in traffic["models"]
                r = await client.get("/api/mesh/traffic")
                assert r.json()["recent"] == traffic["recent"]


async def test_nothing_is_resent_while_nothing_changes_and_idle_streams_get_a_comment():
    with trio.fail_after(15):
        async with running_gateway(_mesh()) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            _fast(gw, tick=0.02, heartbeat=0.3)
            # The traffic event legitimately comes again when its 10 s step moves on (the charts
            # slide); a frozen wall clock keeps this test off that boundary.
            frozen = gw.app.extensions["meshollama"].traffic.clock()
            gw.app.extensions["meshollama"].traffic.clock = lambda: frozen
            async with client.stream("GET", "/api/mesh/events") as resp:
                events = Events(resp)
                assert [(await events.next())[0] for _ in range(4)] == ["hello", "mesh", "models", "traffic"]
                # ~15 ticks go by with only the heartbeat ages moving: a comment, no event
                assert await events.next() == ("#", "keep-alive")
                assert await events.next() == ("#", "keep-alive")


def test_fingerprints_ignore_what_moves_by_itself():
    a = {"peers": [{"peer_id": "x", "seconds_since_heartbeat": 1.0}], "node": {"uptime_seconds": 5}}
    b = {"peers": [{"peer_id": "x", "seconds_since_heartbeat": 3.0}], "node": {"uptime_seconds": 7}}
    c = {"peers": [{"peer_id": "y", "seconds_since_heartbeat": 3.0}], "node": {"uptime_seconds": 7}}
    assert fingerprint("mesh", a) == fingerprint("mesh", b) != fingerprint("mesh", c)
    assert fingerprint("traffic", {"now": 1, "x": 1}) == fingerprint("traffic", {"now": 2, "x": 1})
    assert frame("mesh", {"a": "line\nbreak"}) == b'event: mesh\ndata: {"a":"line\\nbreak"}\n\n'


async def test_shutdown_ends_open_streams_at_once():
    """An endless answer must not hold Hypercorn's graceful shutdown for its whole grace period."""
    with trio.fail_after(15):
        async with httpx.AsyncClient(timeout=10) as client:
            async with running_gateway(_mesh(), grace_period=8.0) as gw:
                _fast(gw)
                resp_cm = client.stream("GET", gw.url + "/api/mesh/events")
                resp = await resp_cm.__aenter__()
                events = Events(resp)
                await events.until("traffic")
                gw.cancel_scope.cancel()
                started = trio.current_time()
            took = trio.current_time() - started
            assert await events.until("bye") == {"reason": "shutting down"}
            await resp_cm.__aexit__(None, None, None)
            assert took < 3.0, f"shutdown waited {took:.1f}s for an event stream"


async def test_streams_are_capped_and_a_closed_one_frees_its_place():
    with trio.fail_after(15):
        async with running_gateway(_mesh()) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            _fast(gw)
            feeds = gw.app.extensions["meshollama"].panel_feeds
            feeds.max_streams = 2
            async with client.stream("GET", "/api/mesh/events") as one:
                first = Events(one)  # kept: a dropped reader's generator would close its connection
                await first.until("hello")
                async with client.stream("GET", "/api/mesh/events") as two:
                    second = Events(two)
                    await second.until("hello")
                    r = await client.get("/api/mesh/events")
                    assert r.status_code == 503 and r.headers["retry-after"] == "10" and "at most 2" in r.json()["error"]
                while feeds.open_streams() > 1:  # the server sees the client leave
                    await trio.sleep(0.01)
                async with client.stream("GET", "/api/mesh/events") as three:
                    assert three.status_code == 200
                    third = Events(three)
                    await third.until("hello")
                    assert feeds.open_streams() == 2


async def test_the_same_caller_gets_a_few_streams_not_all_of_them(tmp_path):
    keys = _keys(tmp_path)
    with trio.fail_after(15):
        async with running_gateway(_mesh(), data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            _fast(gw)
            feeds = gw.app.extensions["meshollama"].panel_feeds
            feeds.max_per_caller = 2
            async with client.stream("GET", "/api/mesh/events", headers=bearer(keys[R])) as one, \
                    client.stream("GET", "/api/mesh/events", headers=bearer(keys[R])) as two:
                held = [Events(one), Events(two)]
                for events in held:
                    await events.until("hello")
                r = await client.get("/api/mesh/events", headers=bearer(keys[R]))
                assert r.status_code == 503 and r.headers["retry-after"] == "10"
                assert "for this caller (at most 2)" in r.json()["error"]
                async with client.stream("GET", "/api/mesh/events", headers=bearer(keys[A])) as other:
                    assert other.status_code == 200  # another key has its own share
                    assert (await Events(other).until("hello"))["role"] == "admin"


def test_the_owner_of_a_stream_is_the_key_or_else_the_address():
    scope = {"client": ("192.0.2.7", 50123)}
    assert stream_owner(Caller(R, "key", "0123abcd"), scope) == "key:0123abcd"
    assert stream_owner(Caller(U, "jwt", "alice"), scope) == "jwt:alice"
    assert stream_owner(ANONYMOUS, scope) == stream_owner(None, {"client": ("192.0.2.7", 1)}) == "address:192.0.2.7"
    assert stream_owner(ANONYMOUS, {}) == "address:-"


async def _stalled_client(host: str, port: int) -> trio.socket.SocketType:
    """Asks for the events and never reads them, with a small receive window."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    await sock.send(f"GET /api/mesh/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


async def test_a_client_that_stops_reading_loses_its_stream():
    with trio.fail_after(20):
        async with running_gateway(_mesh()) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            _fast(gw, tick=0.02, heartbeat=0.2)
            feeds = gw.app.extensions["meshollama"].panel_feeds
            feeds.max_per_caller = 1
            feeds.send_timeout = 0.5
            changes = iter(range(10**9))
            feeds.build = lambda: {"mesh": lambda: {"n": next(changes), "blob": "x" * 500_000}}  # 25 MB/s
            host, port = gw.url.removeprefix("http://").rsplit(":", 1)
            sock = await _stalled_client(host, int(port))
            try:  # closed whatever happens: the server's write to it cannot be cancelled, not even on shutdown
                while feeds.open_streams() == 0:
                    await trio.sleep(0.01)
                assert (await client.get("/api/mesh/events")).status_code == 503  # its one stream is taken
                while feeds.open_streams():  # the server's buffers fill, the write waits, the stream is given up
                    await trio.sleep(0.05)
                async with client.stream("GET", "/api/mesh/events") as resp:
                    assert resp.status_code == 200
                    await Events(resp).until("hello")
            finally:
                sock.close()


async def test_a_stream_ends_when_its_key_is_revoked(tmp_path):
    keys = _keys(tmp_path)
    mesh = _mesh()
    with trio.fail_after(20):
        async with running_gateway(mesh, data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            _fast(gw)
            ro = bearer(keys[R])
            async with c.stream("GET", "/api/mesh/events", headers=ro) as resp:
                events = Events(resp)
                await events.until("mesh")
                assert keystore.revoke(tmp_path / "api_keys.json", keystore.key_id(keys[R])) is not None
                while (await c.get("/api/mesh/peers", headers=ro)).status_code != 401:  # read again within 1 s
                    await trio.sleep(0.1)
                mesh.add("peer-new", [model("secret-model:1b")])
                while True:
                    name, data = await events.next()
                    assert name != "mesh" or all(p["peer_id"] != "peer-new" for p in data["peers"])
                    if name == "bye":
                        assert data == {"reason": REVOKED}
                        break
                with pytest.raises(StopAsyncIteration):
                    await events.next()


async def test_a_stream_opened_on_an_open_gateway_ends_when_it_needs_keys(tmp_path):
    with trio.fail_after(20):
        async with running_gateway(_mesh(), data_dir=tmp_path) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            _fast(gw)
            async with c.stream("GET", "/api/mesh/events") as resp:
                events = Events(resp)
                assert (await events.until("hello"))["open"] is True
                keystore.create(tmp_path / "api_keys.json", "admin", "first")
                assert await events.until("bye") == {"reason": REVOKED}
            assert (await c.get("/api/mesh/events")).status_code == 401


def test_the_stream_credential_check(tmp_path):
    path = tmp_path / "api_keys.json"
    plain, entry = keystore.create(path, "user", "dash")
    keys = keystore.KeyStore(path, recheck=0.0)
    auth = Authenticator(keys)
    now = [100.0]
    caller = auth.authenticate(f"Bearer {plain}", now[0])
    assert isinstance(caller, Caller) and caller.kind == "key"
    check = credential_check(auth, caller, clock=lambda: now[0])
    assert check() is None
    entries = keystore.read_file(path)
    keystore.write_file(path, [keystore.entry_from_dict({**e.to_dict(), "role": "readonly"}) for e in entries])
    assert check() == ROLE_CHANGED
    keystore.revoke(path, entry.id)
    assert check() == REVOKED
    path.unlink()  # no key file any more: the gateway is open, everyone may read
    assert check() is None

    jwt_auth = Authenticator(keystore.KeyStore(None), jwt=object())  # type: ignore[arg-type]
    jwt_check = credential_check(jwt_auth, Caller(R, "jwt", "alice"), clock=lambda: now[0], jwt_lifetime=300)
    assert jwt_check() is None
    now[0] += 300
    assert jwt_check() == REAUTHENTICATE  # its expiry is not known here: the client presents it again

    shared = keystore.KeyStore(None)
    shared.set_shared([{"id": "team", "name": "team", "role": "readonly", "sha256": "ab" * 32}])
    shared_check = credential_check(Authenticator(shared), Caller(R, "shared", "team", "team"), clock=lambda: now[0])
    assert shared_check() is None
    shared.set_shared([], required=True)
    assert shared_check() == REVOKED


async def test_an_update_that_cannot_be_built_ends_the_stream_with_an_error_logged_once(caplog):
    with trio.fail_after(15):
        async with running_gateway(_mesh()) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
            _fast(gw)
            feeds = gw.app.extensions["meshollama"].panel_feeds

            def broken() -> dict:
                raise KeyError("nope")

            feeds.build = lambda: {"mesh": broken}
            caplog.set_level(logging.ERROR, "meshollama.gateway.panel_events")
            for _ in range(3):  # the client reconnects into the same failure: logged once
                async with client.stream("GET", "/api/mesh/events") as resp:
                    events = Events(resp)
                    await events.until("hello")
                    assert await events.next() == ("error", {"message": "the node could not build the mesh update"})
                    with pytest.raises(StopAsyncIteration):
                        await events.next()
                await trio.sleep(0.1)
            logged = [r for r in caplog.records if r.name == "meshollama.gateway.panel_events"]
            assert len(logged) == 1 and logged[0].exc_info is not None
            assert feeds.open_streams() == 0
