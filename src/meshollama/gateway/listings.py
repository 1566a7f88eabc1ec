"""Mesh-wide listings as Ollama and OpenAI clients expect them (pure).

Every function takes a :class:`~meshollama.mesh.peertable.Snapshot` (and the
wall-clock time where a timestamp must be invented) and returns plain JSON
data, so the shapes are tested without HTTP. Only ALIVE peers count.

Shapes follow ``shared/reference/ollama-api.md``: ``/api/tags`` §2.7 (both
``name`` and ``model``, RFC 3339 ``modified_at``, newest first, ``[]`` never
``null``), ``/api/ps`` §2.8, ``/v1/models`` §3.5-3.6.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from .. import names
from ..catalog import RUNNING_FACTS, ModelInfo
from ..mesh.peertable import PeerView, Snapshot

# Go's zero time: what Ollama itself would print for an unknown timestamp.
ZERO_TIME = "0001-01-01T00:00:00Z"
# Ollama's default keep_alive: the best guess of when an announced-loaded model unloads.
DEFAULT_KEEP_ALIVE = 300.0
_BASE_DETAILS = {
    "parent_model": "",
    "format": "",
    "family": "",
    "families": None,
    "parameter_size": "",
    "quantization_level": "",
}
_FRACTION = re.compile(r"\.(\d+)")


def parse_time(text: str) -> float | None:
    """Unix seconds of an RFC 3339 time (nanoseconds and ``Z`` allowed), None if unparseable."""
    if not text:
        return None
    t = text.strip().replace("z", "Z")
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    t = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), t, count=1)
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        return dt.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def format_time(unix: float) -> str:
    """RFC 3339 in UTC with ``Z``, as Ollama writes ``created_at``."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _details(m: ModelInfo) -> dict[str, Any]:
    out = dict(_BASE_DETAILS)
    for k, v in m.details.items():
        if k not in RUNNING_FACTS:  # /api/ps's, not part of Ollama's ModelDetails
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _alive_models(snapshot: Snapshot) -> Iterator[tuple[PeerView, ModelInfo]]:
    for peer in snapshot.alive():
        for m in peer.models:
            yield peer, m


def _unique(snapshot: Snapshot, *, loaded_only: bool = False) -> list[ModelInfo]:
    """One entry per (model key, digest), first announcer wins (peers are sorted by id)."""
    seen: dict[tuple[str, str], ModelInfo] = {}
    for _, m in _alive_models(snapshot):
        if loaded_only and not m.loaded:
            continue
        seen.setdefault((names.key(m.name), m.digest.lower()), m)
    return list(seen.values())


def _newest_first(models: list[ModelInfo]) -> list[ModelInfo]:
    # Unknown times sort last; ties by name so the order is stable.
    by_name = sorted(models, key=lambda m: names.shortest(m.name))
    return sorted(by_name, key=lambda m: -(parse_time(m.modified_at) or float("-inf")))


def tag_entry(m: ModelInfo) -> dict[str, Any]:
    name = names.shortest(m.name)
    entry: dict[str, Any] = {
        "name": name,
        "model": name,
        "modified_at": m.modified_at if parse_time(m.modified_at) is not None else ZERO_TIME,
        "size": int(m.size),
        "digest": m.digest,
        "details": _details(m),
    }
    if m.capabilities:
        entry["capabilities"] = list(m.capabilities)
    return entry


def tags(snapshot: Snapshot) -> dict[str, Any]:
    """``GET /api/tags``: every model any alive peer serves, de-duplicated by name and digest."""
    return {"models": [tag_entry(m) for m in _newest_first(_unique(snapshot))]}


def _int_detail(m: ModelInfo, key: str, default: int) -> int:
    v = m.details.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def ps(snapshot: Snapshot, wall_now: float) -> dict[str, Any]:
    """``GET /api/ps``: models announced as loaded, best effort.

    An Ollama-backed peer puts Ollama's own ``expires_at``, ``size_vram`` and
    ``context_length`` in the model's details; for a peer that does not
    (the embedded backend), ``expires_at`` is ``wall_now`` plus Ollama's
    default keep-alive and ``size_vram`` is the model size (assumed resident).
    """
    entries = []
    for m in _unique(snapshot, loaded_only=True):
        size = int(m.size)
        expires = m.details.get("expires_at")
        if not (isinstance(expires, str) and parse_time(expires) is not None):
            expires = format_time(wall_now + DEFAULT_KEEP_ALIVE)
        entry = tag_entry(m)
        del entry["modified_at"]
        entry.update(
            expires_at=expires,
            size_vram=min(_int_detail(m, "size_vram", size), size) if size else _int_detail(m, "size_vram", 0),
            context_length=_int_detail(m, "context_length", 0),
        )
        entries.append(entry)
    entries.sort(key=lambda e: e["name"])
    entries.sort(key=lambda e: -(parse_time(e["expires_at"]) or 0.0))
    return {"models": entries}


def _owned_by(name: str) -> str:
    try:
        return names.parse(name).namespace
    except Exception:
        return "library"


def _openai_entry(m: ModelInfo, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(parse_time(m.modified_at) or 0),
        "owned_by": _owned_by(m.name),
    }


def openai_models(snapshot: Snapshot) -> dict[str, Any]:
    """``GET /v1/models``: one entry per model name, in ``/api/tags`` order."""
    data = []
    seen: set[str] = set()
    for m in _newest_first(_unique(snapshot)):
        model_id = names.shortest(m.name)
        if model_id not in seen:
            seen.add(model_id)
            data.append(_openai_entry(m, model_id))
    return {"object": "list", "data": data}


def openai_model(snapshot: Snapshot, model_id: str) -> dict[str, Any] | None:
    """``GET /v1/models/{id}``: the id echoed verbatim; None if no alive peer has it."""
    if not names.is_valid(model_id):
        return None
    key = names.key(model_id)
    for m in _newest_first(_unique(snapshot)):
        if names.key(m.name) == key:
            return _openai_entry(m, model_id)
    return None


def models_count(snapshot: Snapshot) -> int:
    """Distinct model names served by alive peers."""
    return len({names.key(m.name) for _, m in _alive_models(snapshot)})


def peer_entry(peer: PeerView, now: float) -> dict[str, Any]:
    return {
        "peer_id": peer.peer_id,
        "addrs": list(peer.addrs),
        "api_url": peer.api_url,
        "version": peer.version,
        "models": [
            {"name": names.shortest(m.name), "digest": m.digest, "size": int(m.size), "loaded": m.loaded}
            for m in peer.models
        ],
        "load": {"in_flight": peer.load.in_flight, "capacity": peer.load.capacity, "queued": peer.load.queued,
                 "waiting": peer.load.waiting},
        "seconds_since_heartbeat": round(max(0.0, now - peer.last_seen), 3),
        "state": peer.state.value,
        "is_self": peer.is_self,
        "relay": peer.relay,
        "more_models": peer.more,  # it holds models its announcement leaves out (the DHT has them)
    }


def mesh_peers(snapshot: Snapshot) -> list[dict[str, Any]]:
    """``GET /api/mesh/peers``: every peer in the table (alive, down, unreachable), ourselves included."""
    return [peer_entry(p, snapshot.taken_at) for p in snapshot.peers]


def mesh_status(snapshot: Snapshot, self_id: str, extra: Mapping[str, Any], version: str) -> dict[str, Any]:
    """``GET /api/mesh/status``: counts, plus the mesh service's own ``status()`` under ``mesh``."""
    by_state: dict[str, int] = {}
    for p in snapshot.peers:
        by_state[p.state.value] = by_state.get(p.state.value, 0) + 1
    return {
        "self_id": self_id,
        "version": version,
        "peers": {"total": len(snapshot.peers), **{s: by_state.get(s, 0) for s in ("alive", "draining", "down", "unreachable")}, **by_state},
        "models": models_count(snapshot),
        "mesh": dict(extra),
    }
