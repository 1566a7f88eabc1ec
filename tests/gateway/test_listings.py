"""Listings built from a peer-table snapshot (pure: no HTTP, no trio)."""

from __future__ import annotations

import re

import pytest

from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.gateway import listings
from meshollama.mesh.peertable import PeerState, PeerView, Snapshot

A64 = "a" * 64
B64 = "b" * 64


def m(name: str, digest: str = A64, *, t: str = "2024-05-01T10:00:00Z", loaded: bool = False,
      size: int = 100, caps: tuple[str, ...] = (), **details) -> ModelInfo:
    return ModelInfo(name=name, digest=digest, size=size, loaded=loaded, modified_at=t,
                     details=details, capabilities=caps)


def peer(pid: str, *models: ModelInfo, state: PeerState = PeerState.ALIVE, last_seen: float = 90.0,
         is_self: bool = False) -> PeerView:
    return PeerView(peer_id=pid, addrs=(f"/ip4/10.0.0.1/tcp/4001/p2p/{pid}",), api_url="http://10.0.0.1:11434",
                    version="0.1.0", models=models, load=LoadInfo(in_flight=1, capacity=4, queued=2), seq=3,
                    last_seen=last_seen, state=state, is_self=is_self)


def snap(*peers: PeerView, now: float = 100.0) -> Snapshot:
    return Snapshot(peers=tuple(sorted(peers, key=lambda p: p.peer_id)), taken_at=now)


# --- /api/tags ------------------------------------------------------------------


def test_tags_empty_is_a_list_never_null():
    assert listings.tags(snap()) == {"models": []}


def test_tags_deduplicates_by_name_and_digest_across_peers():
    s = snap(
        peer("p1", m("llama3:latest"), m("qwen:0.5b", B64)),
        peer("p2", m("library/LLAMA3"), m("qwen:0.5b", A64)),  # same llama3 spelled differently; other qwen build
    )
    got = listings.tags(s)["models"]
    pairs = sorted((e["name"], e["digest"]) for e in got)
    assert pairs == [("llama3:latest", A64), ("qwen:0.5b", A64), ("qwen:0.5b", B64)]


def test_tags_entry_shape_matches_ollama():
    s = snap(peer("p1", m("user/mistral:7b", size=4_000_000_000, caps=("completion", "tools"),
                          family="llama", families=("llama",), format="gguf")))
    (e,) = listings.tags(s)["models"]
    assert e["name"] == e["model"] == "user/mistral:7b"
    assert e["size"] == 4_000_000_000 and e["digest"] == A64
    assert e["modified_at"] == "2024-05-01T10:00:00Z"
    assert e["details"]["family"] == "llama" and e["details"]["families"] == ["llama"]
    for key in ("parent_model", "format", "parameter_size", "quantization_level"):
        assert key in e["details"]
    assert e["capabilities"] == ["completion", "tools"]


def test_tags_newest_first_unknown_times_last():
    s = snap(peer("p1",
                  m("old:latest", t="2023-01-01T00:00:00Z"),
                  m("new:latest", t="2024-06-01T12:00:00.123456789+02:00"),
                  m("mid:latest", t="2024-01-01T00:00:00-07:00"),
                  m("none:latest", t="")))
    got = listings.tags(s)["models"]
    assert [e["name"] for e in got] == ["new:latest", "mid:latest", "old:latest", "none:latest"]
    assert got[-1]["modified_at"] == listings.ZERO_TIME  # still RFC 3339 for clients that parse it


def test_tags_only_alive_peers():
    s = snap(peer("p1", m("up:latest")), peer("p2", m("gone:latest"), state=PeerState.DOWN))
    assert [e["name"] for e in listings.tags(s)["models"]] == ["up:latest"]


# --- /api/ps --------------------------------------------------------------------


def test_ps_lists_loaded_models_with_every_field():
    s = snap(peer("p1", m("llama3:latest", loaded=True, size=500, context_length=4096), m("cold:latest")),
             peer("p2", m("llama3:latest", loaded=True, size=500)))
    (e,) = listings.ps(s, wall_now=1_700_000_000.0)["models"]
    assert e["name"] == e["model"] == "llama3:latest"
    for key in ("size", "digest", "details", "expires_at", "size_vram", "context_length"):
        assert key in e
    assert 0 <= e["size_vram"] <= e["size"] == 500
    assert e["context_length"] == 4096
    assert listings.parse_time(e["expires_at"]) == pytest.approx(1_700_000_000.0 + listings.DEFAULT_KEEP_ALIVE)
    assert "modified_at" not in e


def test_ps_empty():
    assert listings.ps(snap(peer("p1", m("x:latest"))), wall_now=0.0) == {"models": []}


# --- /v1/models -----------------------------------------------------------------


def test_openai_models():
    s = snap(peer("p1", m("llama3:latest", t="2024-05-01T10:00:00Z"), m("user/m:tag", t="2024-04-01T00:00:00Z")),
             peer("p2", m("llama3:latest", B64)))  # same id, other digest: one entry
    got = listings.openai_models(s)
    assert got["object"] == "list"
    assert got["data"] == [
        {"id": "llama3:latest", "object": "model", "created": 1714557600, "owned_by": "library"},
        {"id": "user/m:tag", "object": "model", "created": 1711929600, "owned_by": "user"},
    ]


def test_openai_models_empty_is_a_list():
    assert listings.openai_models(snap()) == {"object": "list", "data": []}


@pytest.mark.parametrize("asked", ["llama3", "LLAMA3:latest", "library/llama3"])
def test_openai_model_echoes_the_id_verbatim(asked):
    s = snap(peer("p1", m("llama3:latest")))
    assert listings.openai_model(s, asked) == {
        "id": asked, "object": "model", "created": 1714557600, "owned_by": "library"}


@pytest.mark.parametrize("asked", ["nope", "bad name!", ""])
def test_openai_model_missing(asked):
    assert listings.openai_model(snap(peer("p1", m("llama3:latest"))), asked) is None


# --- mesh status ----------------------------------------------------------------


def test_mesh_peers():
    s = snap(peer("me", m("a:latest", loaded=True), is_self=True, last_seen=100.0),
             peer("p2", state=PeerState.DOWN, last_seen=97.5), now=100.0)
    got = listings.mesh_peers(s)
    assert [p["peer_id"] for p in got] == ["me", "p2"]
    me, p2 = got
    assert set(me) == {"peer_id", "addrs", "api_url", "version", "models", "load",
                       "seconds_since_heartbeat", "state", "is_self", "relay", "more_models"}
    assert me["is_self"] and me["state"] == "alive"
    assert me["models"] == [{"name": "a:latest", "digest": A64, "size": 100, "loaded": True}]
    assert me["load"] == {"in_flight": 1, "capacity": 4, "queued": 2, "waiting": 0}
    assert p2["state"] == "down" and p2["seconds_since_heartbeat"] == 2.5


def test_mesh_status():
    s = snap(peer("me", m("a:latest"), is_self=True), peer("p2", m("A"), m("b:1")),
             peer("p3", m("c:latest"), state=PeerState.DOWN))
    got = listings.mesh_status(s, "me", {"uptime": 5}, "0.1.0")
    assert got["self_id"] == "me"
    assert got["peers"] == {"total": 3, "alive": 2, "draining": 0, "down": 1, "unreachable": 0}
    assert got["models"] == 2  # a:latest (twice) and b:1; the DOWN peer's c does not count
    assert got["mesh"] == {"uptime": 5}


# --- time parsing ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "unix"), [
    ("2024-05-01T10:00:00Z", 1714557600.0),
    ("2024-05-01T10:00:00.123456789Z", 1714557600.123456),
    ("2024-05-01T12:00:00+02:00", 1714557600.0),
    ("0001-01-01T00:00:00Z", -62135596800.0),
])
def test_parse_time(text, unix):
    assert listings.parse_time(text) == pytest.approx(unix)


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01T00:00:00Z"])
def test_parse_time_garbage(text):
    assert listings.parse_time(text) is None


def test_format_time_is_rfc3339_utc():
    assert re.fullmatch(r"2024-05-01T10:00:00Z", listings.format_time(1714557600.0))


def test_running_facts_show_in_ps_not_in_tags_details():
    facts = {"family": "llama", "expires_at": "2318-08-01T00:00:00Z", "size_vram": 7, "context_length": 4096}
    loaded = ModelInfo(name="llama3:latest", digest=A64, size=10, loaded=True, details=facts)
    s = snap(peer("p1", loaded))
    (tag,) = listings.tags(s)["models"]
    assert tag["details"]["family"] == "llama"
    assert not {"expires_at", "size_vram", "context_length"} & set(tag["details"])
    (ps,) = listings.ps(s, wall_now=0.0)["models"]
    assert (ps["expires_at"], ps["size_vram"], ps["context_length"]) == ("2318-08-01T00:00:00Z", 7, 4096)
