"""The heartbeat codec: what a node tells the mesh about itself (sans-IO).

Every node publishes an :class:`Announcement` on a timer (and at once when its
models or load change); everyone else builds its peer table from them. The
bytes come from the network, so :func:`decode` treats them as hostile: the
size is checked before parsing, every field's type and bound is checked, and
whatever goes wrong surfaces as :class:`~meshollama.errors.AnnouncementError`
and nothing else, so the mesh service needs exactly one ``except``.

Wire format: one compact UTF-8 JSON object with short, stable keys (a node
with a couple of hundred models must fit in :data:`MAX_ANNOUNCEMENT_BYTES`).
Fields equal to their default are left out; unknown keys are ignored so a
newer minor version can add fields; a higher ``v`` (schema) is rejected::

    {"v":1,"id":"12D3...","seq":7,"ver":"0.1.0",
     "m":[{"n":"llama3:latest","d":"<64 hex>","s":4661224676,"l":true,
           "t":"2024-05-01T10:00:00Z","x":{"family":"llama"},"c":["completion"]}],
     "ld":{"f":1,"c":4,"q":0},
     "a":["/ip4/10.0.0.2/tcp/4001/p2p/12D3..."],"u":"http://10.0.0.2:11434","bye":true,"r":true,"dr":true}

``st`` (the node's model store: ``k`` kind, ``f`` bytes free for replicas,
``a`` accepts replicas, ``lb`` labels, ``p`` models it is pulling) and ``rp`` (copy-count targets:
``[[model, copies, stamp, labels?], ...]``, newest stamp wins) came with model distribution, left out
when empty like ``dr``.

``ri`` (the sender's refresh interval in milliseconds: ``mesh.cadence``) came with
announcing less: a sender that says it refreshes every 30 s is expired after
``miss_limit`` of those, clamped to [our heartbeat interval, :data:`MAX_REFRESH_MS`];
left out (0), the sender is an older node that beats every heartbeat interval.

``dn`` (down hints, ``mesh.hints``: ``[[peer id, seq], ...]``, at most
:data:`MAX_DOWN`) names peers the sender saw go down, with the seq each last
announced; left out when empty.

``mm`` (true: the sender holds models this announcement leaves out, past
:data:`MAX_MODELS` or :data:`MAX_ANNOUNCEMENT_BYTES`; gateways look for those
in the DHT, ``mesh.holders``) is left out when false. ``lq`` (true: the
sender does not announce its load changes, its table being past
``p2p.full_view_up_to``) tells a gateway whose own table is smaller (tables
differ) to ask it for its load when it routes, as a large mesh's do.

``dr`` (draining) was added after ``bye`` and ``r``, the same way: left out
when false, so an older node reads a draining node's heartbeat as an ordinary
one (it ignores the key) and a newer node reads an older node's as not
draining.

Model names are normalised to :func:`meshollama.names.shortest` on decode
(and on encode); an invalid model name rejects the whole announcement. Two
entries with the same :func:`~meshollama.names.key` keep the first.

Everything a peer announces is bounded: the whole message
(:data:`MAX_ANNOUNCEMENT_BYTES`), models (:data:`MAX_MODELS`), addresses
(:data:`MAX_ADDRS`), every string, list and integer; load numbers are clamped
to :data:`MAX_CAPACITY` and :data:`MAX_LOAD` so a liar gets no more than its
fair share of requests (``tests/unit/test_fair_share.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .. import names
from ..catalog import LoadInfo, ModelInfo, ReplicaTarget, StoreInfo
from ..errors import AnnouncementError

SCHEMA_VERSION = 1
MAX_ANNOUNCEMENT_BYTES = 64 * 1024
MAX_MODELS = 256

MAX_STR = 512  # every string, from the peer id to a detail value
MAX_INT = 2**63 - 1  # every integer is in 0..MAX_INT
MAX_ADDRS = 32
MAX_CAPABILITIES = 32
MAX_DETAILS = 32  # keys in one model's ``details``
MAX_DETAIL_LIST = 32  # items in one list-valued detail
# Load numbers are clamped, not rejected: they steer routing, and a peer must
# not buy more than its fair share of the mesh's requests by lying. Routing
# sends work in proportion to free slots (``(busy + 1) / capacity``), so a
# peer announcing capacity 2**40 would look idle for ever and get nearly
# every request. 128 slots is above any real node (Ollama's NUM_PARALLEL and
# llama.cpp's slots are single digits to tens), so an honest node is never
# clamped, and a liar gets what an honest 128-slot node would.
MAX_CAPACITY = 128
MAX_REPLICAS = 64  # copy-count targets one heartbeat carries
MAX_COPIES = 64  # a target above it is clamped: nobody can ask every node of a big mesh for a copy
MAX_LABELS = 16
MAX_DOWN = 16  # down hints one announcement carries (mesh.hints)
MAX_REFRESH_MS = 600_000  # a peer may ask to be remembered for miss_limit x 10 min of silence at most
MAX_LOAD = 1 << 20  # in_flight and queued: far above any real queue; keeps routing arithmetic small


@dataclass(frozen=True)
class Announcement:
    """One heartbeat of one node."""

    peer_id: str  # base58 peer id of the publisher
    seq: int  # strictly increasing per peer
    version: str  # meshollama version
    models: tuple[ModelInfo, ...]
    load: LoadInfo
    addrs: tuple[str, ...] = ()  # dialable multiaddrs (with /p2p/)
    api_url: str = ""
    leaving: bool = False  # True in the final "I am shutting down" message
    relay: bool = False  # serves Circuit Relay v2 (HOP) for nodes behind NAT
    draining: bool = False  # finishing its requests before a restart: route no new ones to it
    store: StoreInfo | None = None  # where it keeps models; None: it cannot take any
    replicas: tuple[ReplicaTarget, ...] = ()  # copy-count targets it knows (it relays the newest)
    refresh_ms: int = 0  # it speaks at least this often (ms); 0: an older node, every heartbeat interval
    down: tuple[tuple[str, int], ...] = ()  # (peer id, seq) of peers it saw go down (mesh.hints)
    more: bool = False  # it holds models this announcement leaves out (:func:`fit`): ask the DHT
    quiet_load: bool = False  # it does not announce load changes (a large mesh for it): ask it
    schema: int = SCHEMA_VERSION


# --- encode -----------------------------------------------------------------


def _detail_ok(k: Any, v: Any) -> bool:
    if not isinstance(k, str):
        return False
    if isinstance(v, str):
        return True
    if isinstance(v, int) and not isinstance(v, bool):
        return True
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def _model_obj(m: ModelInfo) -> dict[str, Any]:
    o: dict[str, Any] = {"n": names.shortest(m.name)}
    if m.digest:
        o["d"] = m.digest
    if m.size:
        o["s"] = m.size
    if m.loaded:
        o["l"] = True
    if m.modified_at:
        o["t"] = m.modified_at
    # ``details`` is best-effort metadata copied from Ollama, which sends
    # ``null`` for some keys: entries the wire cannot carry are left out
    # instead of failing the whole heartbeat.
    details = {k: (list(v) if isinstance(v, tuple) else v) for k, v in m.details.items() if _detail_ok(k, v)}
    if details:
        o["x"] = details
    if m.capabilities:
        o["c"] = list(m.capabilities)
    return o


def _to_obj(a: Announcement) -> dict[str, Any]:
    o: dict[str, Any] = {
        "v": a.schema,
        "id": a.peer_id,
        "seq": a.seq,
        "ver": a.version,
        "m": [_model_obj(m) for m in a.models],
        "ld": {"f": a.load.in_flight, "c": a.load.capacity, "q": a.load.queued},
    }
    if a.load.waiting:  # added later: left out when 0, so older nodes read the same bytes
        o["ld"]["w"] = a.load.waiting
    if a.addrs:
        o["a"] = list(a.addrs)
    if a.api_url:
        o["u"] = a.api_url
    if a.leaving:
        o["bye"] = True
    if a.relay:
        o["r"] = True
    if a.draining:
        o["dr"] = True
    if a.refresh_ms:
        o["ri"] = a.refresh_ms
    if a.down:
        o["dn"] = [[pid, seq] for pid, seq in a.down]
    if a.more:
        o["mm"] = True
    if a.quiet_load:
        o["lq"] = True
    if a.store is not None:
        st: dict[str, Any] = {"k": a.store.kind, "f": a.store.free}
        if a.store.accepts:
            st["a"] = True
        if a.store.labels:
            st["lb"] = list(a.store.labels)
        if a.store.pulling:
            st["p"] = [names.shortest(m) for m in a.store.pulling]
        o["st"] = st
    if a.replicas:
        o["rp"] = [[names.shortest(r.model), r.copies, r.stamp] + ([list(r.labels)] if r.labels else [])
                   for r in a.replicas]
    return o


def encode(a: Announcement) -> bytes:
    """Compact UTF-8 JSON for ``a``.

    Raises :class:`AnnouncementError` if the result is over
    :data:`MAX_ANNOUNCEMENT_BYTES` or :func:`decode` would reject it (a
    string too long, a negative number, an invalid model name, ...): a bad
    heartbeat is caught by its sender, not by every receiver. :func:`fit`
    makes any announcement encodable.
    """
    try:
        text = json.dumps(_to_obj(a), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        data = text.encode("utf-8")
    except (TypeError, ValueError, AttributeError) as e:  # UnicodeEncodeError is a ValueError
        raise AnnouncementError(f"cannot encode announcement: {e}") from None
    decode(data)  # the same checks a receiver makes
    return data


def fit(a: Announcement) -> Announcement:
    """``a`` trimmed so that :func:`encode` accepts it.

    Drops models that cannot go on the wire (invalid name, negative size,
    over-long strings), clips capability and ``details`` lists to their
    bounds, and if there are more than :data:`MAX_MODELS` models or the
    encoding is too big, keeps loaded models first, drops ``details``, then
    drops models from the end until it fits. Fields outside the model list
    (peer id, addrs, ...) are the caller's to get right.
    """
    models = [_clipped(m) for m in a.models if _model_ok(m)]
    out = replace(a, models=tuple(models))
    while out.replicas and _size(out) > MAX_ANNOUNCEMENT_BYTES // 2:  # targets never crowd out models
        out = replace(out, replicas=out.replicas[:-1])
    if len(models) <= MAX_MODELS and _size(out) <= MAX_ANNOUNCEMENT_BYTES:
        return out
    models.sort(key=lambda m: not m.loaded)  # stable: otherwise keeps the order
    out = replace(out, models=tuple(models[:MAX_MODELS]))  # with the replicas trimmed above
    if _size(out) > MAX_ANNOUNCEMENT_BYTES:
        out = replace(out, models=tuple(replace(m, details={}) for m in out.models))
    while out.models and (size := _size(out)) > MAX_ANNOUNCEMENT_BYTES:
        # Drop about as many models as the excess needs, at least one.
        per_model = max(1, size // len(out.models))
        drop = max(1, (size - MAX_ANNOUNCEMENT_BYTES) // per_model)
        out = replace(out, models=out.models[: len(out.models) - drop])
    # Models left out are still served: gateways find them in the DHT (mesh.holders).
    return replace(out, more=len(out.models) < len(models))


def _model_ok(m: ModelInfo) -> bool:
    return (
        isinstance(m.name, str)
        and names.is_valid(m.name)
        and isinstance(m.digest, str)
        and len(m.digest) <= MAX_STR
        and isinstance(m.modified_at, str)
        and len(m.modified_at) <= MAX_STR
        and isinstance(m.size, int)
        and not isinstance(m.size, bool)
        and 0 <= m.size <= MAX_INT
        and isinstance(m.loaded, bool)
    )


def _detail_fits(k: Any, v: Any) -> bool:
    if not _detail_ok(k, v) or len(k) > MAX_STR:
        return False
    if isinstance(v, str):
        return len(v) <= MAX_STR
    if isinstance(v, int):
        return 0 <= v <= MAX_INT
    return all(len(x) <= MAX_STR for x in v)


def _clipped(m: ModelInfo) -> ModelInfo:
    """``m`` with capabilities and details cut to what the wire carries."""
    caps = tuple(c for c in m.capabilities if isinstance(c, str) and len(c) <= MAX_STR)[:MAX_CAPABILITIES]
    details: dict[str, Any] = {}
    for k, v in m.details.items():
        if len(details) == MAX_DETAILS:
            break
        if _detail_fits(k, v):
            details[k] = tuple(v)[:MAX_DETAIL_LIST] if isinstance(v, (list, tuple)) else v
    if caps == m.capabilities and details == dict(m.details):
        return m
    return replace(m, capabilities=caps, details=details)


def _size(a: Announcement) -> int:
    text = json.dumps(_to_obj(a), separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass"))


# --- decode -----------------------------------------------------------------


def _fail(msg: str) -> AnnouncementError:
    return AnnouncementError(msg)


def _reject_constant(name: str) -> Any:
    raise _fail(f"non-finite number {name}")


def _str(v: Any, what: str, *, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise _fail(f"{what}: expected a string")
    if len(v) > MAX_STR:
        raise _fail(f"{what}: string longer than {MAX_STR}")
    if not empty and not v:
        raise _fail(f"{what}: empty")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogate from a \ud800 escape
        raise _fail(f"{what}: not valid unicode") from None
    return v


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _fail(f"{what}: expected an integer")
    if not 0 <= v <= MAX_INT:
        raise _fail(f"{what}: out of range")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(f"{what}: expected a boolean")
    return v


def _list(v: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(v, list):
        raise _fail(f"{what}: expected a list")
    if len(v) > limit:
        raise _fail(f"{what}: more than {limit} items")
    return v


def _obj(v: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise _fail(f"{what}: expected an object")
    return v


def _details(v: Any, what: str) -> dict[str, Any]:
    d = _obj(v, what)
    if len(d) > MAX_DETAILS:
        raise _fail(f"{what}: more than {MAX_DETAILS} keys")
    out: dict[str, Any] = {}
    for k, x in d.items():
        _str(k, f"{what} key")
        if isinstance(x, str):
            out[k] = _str(x, f"{what}.{k}")
        elif isinstance(x, list):
            out[k] = tuple(_str(i, f"{what}.{k}[]") for i in _list(x, f"{what}.{k}", MAX_DETAIL_LIST))
        else:
            out[k] = _int(x, f"{what}.{k}")
    return out


def _model(v: Any, i: int) -> ModelInfo:
    what = f"m[{i}]"
    o = _obj(v, what)
    name = _str(o.get("n"), f"{what}.n", empty=False)
    try:
        name = names.parse(name).shortest()
    except Exception:  # BadRequest; never let anything but AnnouncementError out
        raise _fail(f"{what}.n: invalid model name") from None
    caps = _list(o.get("c", []), f"{what}.c", MAX_CAPABILITIES)
    return ModelInfo(
        name=name,
        digest=_str(o.get("d", ""), f"{what}.d"),
        size=_int(o.get("s", 0), f"{what}.s"),
        loaded=_bool(o.get("l", False), f"{what}.l"),
        modified_at=_str(o.get("t", ""), f"{what}.t"),
        details=_details(o.get("x", {}), f"{what}.x"),
        capabilities=tuple(_str(c, f"{what}.c[]") for c in caps),
    )


def _store(v: Any) -> StoreInfo:
    st = _obj(v, "st")
    labels = _list(st.get("lb", []), "st.lb", MAX_LABELS)
    pulling = []
    for x in _list(st.get("p", []), "st.p", MAX_LABELS):
        try:
            pulling.append(names.parse(_str(x, "st.p[]", empty=False)).shortest())
        except AnnouncementError:
            raise
        except Exception:
            raise _fail("st.p[]: invalid model name") from None
    return StoreInfo(kind=_str(st.get("k", ""), "st.k"), free=_int(st.get("f", 0), "st.f"),
                     accepts=_bool(st.get("a", False), "st.a"),
                     labels=tuple(_str(x, "st.lb[]") for x in labels), pulling=tuple(pulling))


def _replicas(v: Any) -> tuple[ReplicaTarget, ...]:
    out: dict[str, ReplicaTarget] = {}
    for i, item in enumerate(_list(v, "rp", MAX_REPLICAS)):
        entry = _list(item, f"rp[{i}]", 4)
        if len(entry) < 3:
            raise _fail(f"rp[{i}]: expected [model, copies, stamp, labels?]")
        labels = _list(entry[3], f"rp[{i}][3]", MAX_LABELS) if len(entry) == 4 else []
        name = _str(entry[0], f"rp[{i}][0]", empty=False)
        try:
            name = names.parse(name).shortest()
        except Exception:
            raise _fail(f"rp[{i}][0]: invalid model name") from None
        target = ReplicaTarget(name, min(_int(entry[1], f"rp[{i}][1]"), MAX_COPIES), _int(entry[2], f"rp[{i}][2]"),
                               tuple(_str(x, f"rp[{i}][3][]") for x in labels))
        out.setdefault(names.key(name), target)
    return tuple(out.values())


def _down(v: Any) -> tuple[tuple[str, int], ...]:
    out = []
    for i, item in enumerate(_list(v, "dn", MAX_DOWN)):
        entry = _list(item, f"dn[{i}]", 2)
        if len(entry) != 2:
            raise _fail(f"dn[{i}]: expected [peer id, seq]")
        out.append((_str(entry[0], f"dn[{i}][0]", empty=False), _int(entry[1], f"dn[{i}][1]")))
    return tuple(out)


def _from_obj(o: Any) -> Announcement:
    o = _obj(o, "announcement")
    if "v" not in o or "id" not in o or "seq" not in o:
        raise _fail("missing v, id or seq")
    schema = _int(o["v"], "v")
    if schema < 1:
        raise _fail("v: schema must be >= 1")
    if schema > SCHEMA_VERSION:
        raise _fail(f"v: schema {schema} is newer than ours ({SCHEMA_VERSION})")
    models: list[ModelInfo] = []
    seen: set[str] = set()
    for i, m in enumerate(_list(o.get("m", []), "m", MAX_MODELS)):
        info = _model(m, i)
        k = names.key(info.name)
        if k not in seen:
            seen.add(k)
            models.append(info)
    ld = _obj(o.get("ld", {}), "ld")
    load = LoadInfo(
        in_flight=min(_int(ld.get("f", 0), "ld.f"), MAX_LOAD),
        capacity=min(_int(ld.get("c", 1), "ld.c"), MAX_CAPACITY),
        queued=min(_int(ld.get("q", 0), "ld.q"), MAX_LOAD),
        waiting=min(_int(ld.get("w", 0), "ld.w"), MAX_LOAD),
    )
    return Announcement(
        store=_store(o["st"]) if "st" in o else None,
        replicas=_replicas(o.get("rp", [])),
        peer_id=_str(o["id"], "id", empty=False),
        seq=_int(o["seq"], "seq"),
        version=_str(o.get("ver", ""), "ver"),
        models=tuple(models),
        load=load,
        addrs=tuple(_str(x, "a[]", empty=False) for x in _list(o.get("a", []), "a", MAX_ADDRS)),
        api_url=_str(o.get("u", ""), "u"),
        leaving=_bool(o.get("bye", False), "bye"),
        relay=_bool(o.get("r", False), "r"),
        draining=_bool(o.get("dr", False), "dr"),
        refresh_ms=min(_int(o.get("ri", 0), "ri"), MAX_REFRESH_MS),
        down=_down(o.get("dn", [])),
        more=_bool(o.get("mm", False), "mm"),
        quiet_load=_bool(o.get("lq", False), "lq"),
        schema=schema,
    )


def decode(data: bytes) -> Announcement:
    """Parse and validate one announcement; raises only :class:`AnnouncementError`."""
    try:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _fail("expected bytes")
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            raise _fail(f"announcement over {MAX_ANNOUNCEMENT_BYTES} bytes")
        try:
            text = bytes(data).decode("utf-8")
            obj = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digits limit
            raise _fail(f"not a JSON announcement: {type(e).__name__}") from None
        return _from_obj(obj)
    except AnnouncementError:
        raise
    except Exception as e:  # defence in depth: the contract is "never another exception"
        raise _fail(f"invalid announcement: {type(e).__name__}") from None
