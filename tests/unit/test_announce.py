from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest

from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.errors import AnnouncementError
from meshollama.mesh import announce
from meshollama.mesh.announce import (
    MAX_ANNOUNCEMENT_BYTES,
    MAX_MODELS,
    SCHEMA_VERSION,
    Announcement,
    decode,
    encode,
    fit,
)

DIGEST = "a" * 64
PEER = "12D3KooWExamplePeer"


def full_announcement() -> Announcement:
    return Announcement(
        peer_id=PEER,
        seq=1_700_000_000_000_000_001,
        version="0.1.0",
        models=(
            ModelInfo(
                name="llama3:latest",
                digest=DIGEST,
                size=4_661_224_676,
                loaded=True,
                modified_at="2024-05-01T10:00:00Z",
                details={
                    "format": "gguf",
                    "family": "llama",
                    "families": ("llama",),
                    "parameter_size": "8.0B",
                    "quantization_level": "Q4_0",
                },
                capabilities=("completion", "tools"),
            ),
            ModelInfo(name="user/embed:v1", capabilities=("embedding",)),
        ),
        load=LoadInfo(in_flight=1, capacity=4, queued=2),
        addrs=("/ip4/10.0.0.2/tcp/4001/p2p/" + PEER,),
        api_url="http://10.0.0.2:11434",
    )


def minimal() -> Announcement:
    return Announcement(peer_id="p", seq=7, version="0.1.0", models=(), load=LoadInfo())


def obj(a: Announcement) -> dict[str, Any]:
    return json.loads(encode(a))


# --- round trip and literal bytes -----------------------------------------


def test_round_trip_full() -> None:
    a = full_announcement()
    assert decode(encode(a)) == a


def test_round_trip_leaving() -> None:
    a = replace(minimal(), leaving=True)
    assert decode(encode(a)) == a
    assert decode(encode(a)).leaving is True


def test_gateway_line_depth_travels_as_waiting_and_is_left_out_when_zero() -> None:
    from meshollama.catalog import LoadInfo

    a = replace(minimal(), load=LoadInfo(in_flight=1, capacity=1, queued=0, waiting=3))
    assert b'"ld":{"f":1,"c":1,"q":0,"w":3}' in encode(a)
    assert decode(encode(a)) == a
    # An older node's heartbeat (no "w") reads as nobody waiting.
    assert decode(b'{"v":1,"id":"p","seq":7,"ver":"0.1.0","m":[],"ld":{"f":0,"c":1,"q":0}}').load.waiting == 0


def test_a_peer_cannot_claim_an_unbounded_line_either() -> None:
    from meshollama.mesh.announce import MAX_LOAD

    data = b'{"v":1,"id":"p","seq":7,"ver":"0.1.0","m":[],"ld":{"f":0,"c":1,"q":0,"w":1099511627776}}'
    assert decode(data).load.waiting == MAX_LOAD


def test_literal_bytes_minimal() -> None:
    data = b'{"v":1,"id":"p","seq":7,"ver":"0.1.0","m":[],"ld":{"f":0,"c":1,"q":0}}'
    assert encode(minimal()) == data
    assert decode(data) == minimal()


def test_literal_bytes_full() -> None:
    data = (
        b'{"v":1,"id":"12D3KooWExamplePeer","seq":1700000000000000001,"ver":"0.1.0",'
        b'"m":[{"n":"llama3:latest","d":"' + DIGEST.encode() + b'","s":4661224676,"l":true,'
        b'"t":"2024-05-01T10:00:00Z","x":{"format":"gguf","family":"llama","families":["llama"],'
        b'"parameter_size":"8.0B","quantization_level":"Q4_0"},"c":["completion","tools"]},'
        b'{"n":"user/embed:v1","c":["embedding"]}],'
        b'"ld":{"f":1,"c":4,"q":2},"a":["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWExamplePeer"],'
        b'"u":"http://10.0.0.2:11434"}'
    )
    assert encode(full_announcement()) == data
    assert decode(data) == full_announcement()


def test_literal_leaving() -> None:
    data = b'{"v":1,"id":"p","seq":8,"ver":"","m":[],"ld":{"f":0,"c":0,"q":0},"bye":true}'
    a = decode(data)
    assert a.leaving and a.seq == 8 and a.load == LoadInfo(0, 0, 0)
    assert encode(a) == data


def test_decode_fills_defaults_and_ignores_unknown_keys() -> None:
    a = decode(b'{"v":1,"id":"p","seq":0,"future":{"x":[1,2]},"m":[{"n":"x","new":1}]}')
    assert a == Announcement(
        peer_id="p", seq=0, version="", models=(ModelInfo(name="x:latest"),), load=LoadInfo()
    )


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode(minimal())
    assert decode(bytearray(data)) == minimal()
    assert decode(memoryview(data)) == minimal()


def test_non_ascii_strings_round_trip() -> None:
    a = replace(minimal(), version="0.1.0-β", models=(ModelInfo(name="m", details={"note": "日本語"}),))
    data = encode(a)
    assert "β".encode() in data  # UTF-8, not \u escapes
    assert decode(data).version == "0.1.0-β"


# --- model-name normalisation ---------------------------------------------


@pytest.mark.parametrize(
    "sent, shown",
    [
        ("llama3", "llama3:latest"),
        ("library/llama3:8b", "llama3:8b"),
        ("registry.ollama.ai/library/llama3", "llama3:latest"),
        ("registry.ollama.ai/user/m:t", "user/m:t"),
        ("hf.co/user/m:Q4", "hf.co/user/m:Q4"),
    ],
)
def test_model_names_normalised(sent: str, shown: str) -> None:
    data = json.dumps({"v": 1, "id": "p", "seq": 1, "m": [{"n": sent}]}).encode()
    assert decode(data).models[0].name == shown
    # encode normalises too
    a = replace(minimal(), models=(ModelInfo(name=sent),))
    assert obj(a)["m"][0]["n"] == shown


def test_duplicate_models_keep_first() -> None:
    data = json.dumps(
        {
            "v": 1,
            "id": "p",
            "seq": 1,
            "m": [{"n": "llama3", "s": 1}, {"n": "LLAMA3:latest", "s": 2}, {"n": "b"}],
        }
    ).encode()
    models = decode(data).models
    assert [(m.name, m.size) for m in models] == [("llama3:latest", 1), ("b:latest", 0)]


def test_encode_drops_details_the_wire_cannot_carry() -> None:
    m = ModelInfo(name="m", details={"families": None, "f": 1.5, "nested": {"a": 1}, "ok": "yes", "n": 3})
    out = obj(replace(minimal(), models=(m,)))
    assert out["m"][0]["x"] == {"ok": "yes", "n": 3}


# --- rejection ----------------------------------------------------------------

BASE: dict[str, Any] = {"v": 1, "id": "p", "seq": 1, "ver": "x", "m": [], "ld": {"f": 0, "c": 1, "q": 0}}


def with_(path: str, value: Any) -> bytes:
    """BASE (plus one model) with the field at dotted ``path`` set (or removed if value is DELETE)."""
    o = json.loads(json.dumps(BASE))
    o["m"] = [{"n": "m", "d": "", "s": 0, "l": False, "t": "", "x": {}, "c": []}]
    parts = path.split(".")
    cur: Any = o
    for p in parts[:-1]:
        cur = cur[int(p)] if p.isdigit() else cur[p]
    last = parts[-1]
    if value is DELETE:
        del cur[last]
    elif isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return json.dumps(o).encode()


DELETE = object()


def test_with_helper_base_is_valid() -> None:
    assert decode(with_("ver", "y")).version == "y"


@pytest.mark.parametrize(
    "path, value",
    [
        ("v", DELETE),
        ("id", DELETE),
        ("seq", DELETE),
        ("v", 2),
        ("v", SCHEMA_VERSION + 1),
        ("v", 0),
        ("v", "1"),
        ("v", 1.0),
        ("v", True),
        ("id", ""),
        ("id", 5),
        ("id", None),
        ("id", "x" * 513),
        ("seq", -1),
        ("seq", 1.5),
        ("seq", "1"),
        ("seq", True),
        ("seq", 2**63),
        ("ver", 1),
        ("ver", "v" * 513),
        ("m", {}),
        ("m", "llama3"),
        ("m", [1]),
        ("m", [None]),
        ("m", [{"n": "m"}] * (MAX_MODELS + 1)),
        ("m.0.n", DELETE),
        ("m.0.n", ""),
        ("m.0.n", "bad name"),
        ("m.0.n", "a/b/c/d"),
        ("m.0.n", 3),
        ("m.0.d", 3),
        ("m.0.d", "d" * 513),
        ("m.0.s", -5),
        ("m.0.s", False),
        ("m.0.s", 1e3),
        ("m.0.l", 1),
        ("m.0.l", "true"),
        ("m.0.t", []),
        ("m.0.x", []),
        ("m.0.x", {"k": None}),
        ("m.0.x", {"k": 1.5}),
        ("m.0.x", {"k": True}),
        ("m.0.x", {"k": -1}),
        ("m.0.x", {"k": {"nested": "x"}}),
        ("m.0.x", {"k": [1]}),
        ("m.0.x", {"k": ["s"] * 33}),
        ("m.0.x", {"k": "s" * 513}),
        ("m.0.x", {"k" * 513: "s"}),
        ("m.0.x", {f"k{i}": "s" for i in range(33)}),
        ("m.0.c", "completion"),
        ("m.0.c", [1]),
        ("m.0.c", ["c"] * 33),
        ("ld", []),
        ("ld", None),
        ("ld.f", -1),
        ("ld.c", -1),
        ("ld.q", -1),
        ("ld.f", True),
        ("ld.c", 1.0),
        ("ld.q", "0"),
        ("ld.w", -1),
        ("ld.w", "3"),
        ("ld.w", True),
        ("a", "addr"),
        ("a", [""]),
        ("a", [1]),
        ("a", ["x"] * 33),
        ("u", 1),
        ("u", "u" * 513),
        ("bye", 1),
        ("bye", "yes"),
        ("bye", None),
    ],
)
def test_decode_rejects_bad_field(path: str, value: Any) -> None:
    with pytest.raises(AnnouncementError):
        decode(with_(path, value))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"null",
        b"[]",
        b"1",
        b'"string"',
        b"{",
        b"\xff\xfe{}",
        b'{"v":1,"id":"p","seq":1,"ver":"\xc3"}',  # truncated UTF-8
        '{"v":1,"id":"p","seq":1}'.encode("utf-16"),
        b'{"v":1,"id":"p","seq":NaN}',
        b'{"v":1,"id":"p","seq":Infinity}',
        b'{"v":1,"id":"p","seq":1e400}',
        b'{"v":1,"id":"p","seq":' + b"9" * 5000 + b"}",  # over Python's int digit limit
        b'{"v":1,"id":"\\ud800","seq":1}',  # lone surrogate
        b"[" * 50_000 + b"]" * 10_000,  # deep nesting
        b'{"v":1,"id":"p","seq":1,"x":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ],
)
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(AnnouncementError):
        decode(data)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(AnnouncementError):
        decode("{}")  # type: ignore[arg-type]
    with pytest.raises(AnnouncementError):
        decode(None)  # type: ignore[arg-type]


def test_oversize_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed an oversize announcement")

    monkeypatch.setattr(announce.json, "loads", boom)
    with pytest.raises(AnnouncementError, match="over"):
        decode(b" " * (MAX_ANNOUNCEMENT_BYTES + 1))


def test_size_limit_boundary() -> None:
    data = encode(minimal())
    padded = data[:-1] + b" " * (MAX_ANNOUNCEMENT_BYTES - len(data)) + b"}"
    assert len(padded) == MAX_ANNOUNCEMENT_BYTES
    assert decode(padded) == minimal()
    with pytest.raises(AnnouncementError):
        decode(padded[:-1] + b" }")


# --- encode-side checks and fit() -------------------------------------------


def many_models(n: int, *, details: bool = True) -> tuple[ModelInfo, ...]:
    d = {
        "format": "gguf",
        "family": "llama",
        "families": ("llama",),
        "parameter_size": "8.0B",
        "quantization_level": "Q4_K_M",
    }
    return tuple(
        ModelInfo(
            name=f"model-{i}:tag",
            digest=DIGEST,
            size=10**9 + i,
            modified_at="2024-05-01T10:00:00.123456789+02:00",
            details=d if details else {},
        )
        for i in range(n)
    )


@pytest.mark.parametrize(
    "a",
    [
        replace(minimal(), seq=-1),
        replace(minimal(), peer_id=""),
        replace(minimal(), peer_id="x" * 600),
        replace(minimal(), models=(ModelInfo(name="bad name"),)),
        replace(minimal(), models=(ModelInfo(name="m", size=-1),)),
        replace(minimal(), load=LoadInfo(in_flight=-1)),
        replace(minimal(), schema=2),
        replace(minimal(), version="\ud800"),
        replace(minimal(), load=None),  # type: ignore[arg-type]
        replace(minimal(), models=many_models(MAX_MODELS + 1)),
        replace(minimal(), models=many_models(MAX_MODELS)),  # over 64 KiB
    ],
)
def test_encode_rejects_what_decode_would(a: Announcement) -> None:
    with pytest.raises(AnnouncementError):
        encode(a)


def test_max_models_without_details_fits() -> None:
    a = replace(full_announcement(), models=many_models(MAX_MODELS, details=False))
    assert len(encode(a)) <= MAX_ANNOUNCEMENT_BYTES
    assert decode(encode(a)) == a


def test_fit_passes_a_good_announcement_through() -> None:
    a = full_announcement()
    assert fit(a) == a


def test_fit_drops_bad_models() -> None:
    a = replace(
        minimal(),
        models=(
            ModelInfo(name="a"),
            ModelInfo(name="bad name"),
            ModelInfo(name="b", loaded=True),
            ModelInfo(name="c", size=-1),
            ModelInfo(name="d", digest="x" * 600),
        ),
    )
    out = fit(a)
    assert [m.name for m in out.models] == ["a", "b"]
    encode(out)


def test_fit_keeps_loaded_models_when_cutting() -> None:
    models = tuple(ModelInfo(name=f"m{i}", loaded=(i % 100 == 99)) for i in range(MAX_MODELS + 50))
    out = fit(replace(minimal(), models=models))
    assert len(out.models) == MAX_MODELS
    assert [m.name for m in out.models[:3]] == ["m99", "m199", "m299"]
    assert [m.name for m in out.models[3:5]] == ["m0", "m1"]
    encode(out)


def test_fit_clips_lists_and_details() -> None:
    m = ModelInfo(
        name="m",
        capabilities=tuple(f"c{i}" for i in range(40)),
        details={**{f"k{i}": "v" for i in range(40)}, "none": None},
    )
    out = fit(replace(minimal(), models=(m,)))
    assert len(out.models[0].capabilities) == 32
    assert len(out.models[0].details) <= 32
    encode(out)


def test_fit_shrinks_to_the_limit() -> None:
    a = replace(full_announcement(), models=many_models(1000))
    out = fit(a)
    data = encode(out)
    assert len(data) <= MAX_ANNOUNCEMENT_BYTES
    assert 100 < len(out.models) <= MAX_MODELS
    assert all(not m.details for m in out.models)
    assert [m.name for m in out.models] == [m.name for m in a.models[: len(out.models)]]


def test_fit_keeps_details_when_they_fit() -> None:
    a = replace(minimal(), models=many_models(50))
    assert fit(a).models == a.models


# --- fuzz -------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a byte
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a JSON-ish byte
            b[i:i] = bytes([rng.choice(b'{}[]",:0123456789-tfn\\ e')])
        elif op == 2 and b:  # delete a run
            del b[i : i + rng.randint(1, 8)]
        elif op == 3:  # duplicate a slice
            j = rng.randrange(len(b) + 1)
            b[i:i] = b[min(i, j) : max(i, j)][:64]
        else:  # truncate
            del b[i:]
    return bytes(b)


def test_fuzz_only_announcement_error() -> None:
    rng = random.Random(1234)
    seeds = [encode(full_announcement()), encode(minimal()), encode(replace(minimal(), leaving=True))]
    accepted = 0
    for i in range(4000):
        if i % 4 == 0:
            data = rng.randbytes(rng.randrange(0, 300))
        else:
            data = mutate(rng.choice(seeds), rng)
        try:
            a = decode(data)
        except AnnouncementError:
            continue
        accepted += 1
        # whatever decode accepts is well-typed and re-encodes to something decodable
        assert isinstance(a.seq, int) and a.seq >= 0
        assert all(isinstance(m, ModelInfo) for m in a.models)
        assert decode(encode(a)) == a
    assert accepted > 0  # the mutations do not only produce garbage


# --- model distribution: st (store facts) and rp (copy counts) from a hostile peer -----------

def _with(extra: dict) -> bytes:
    import json as _json

    return _json.dumps({"v": 1, "id": "p", "seq": 1, **extra}).encode()


def test_forged_store_facts_and_copy_counts_are_bounded_or_refused():
    import pytest as _pytest

    from meshollama.errors import AnnouncementError
    from meshollama.mesh import announce as _a

    ok = _a.decode(_with({"st": {"k": "ollama", "f": 5, "a": True, "lb": ["gpu"], "p": ["m"]},
                          "rp": [["m", 10**6, 7], ["m", 1, 9], ["n", 2, 3, ["gpu"]]]}))
    assert ok.store.free == 5 and ok.store.pulling == ("m:latest",)
    assert [(r.model, r.copies) for r in ok.replicas] == [("m:latest", _a.MAX_COPIES), ("n:latest", 2)]
    for bad in ({"st": {"f": -1}}, {"st": {"a": 1}}, {"st": {"lb": "gpu"}}, {"st": {"p": ["Bad Name!"]}},
                {"st": {"p": ["m"] * 17}}, {"st": []}, {"rp": [["m", 1]]}, {"rp": [["m", "1", 2]]},
                {"rp": [["Bad Name!", 1, 2]]}, {"rp": [["m", 1, -2]]}, {"rp": [["m", 1, 2]] * 65},
                {"rp": [["m", 1, 2, ["x"], 5]]}, {"rp": [["m", 1, 2, [3]]]}):
        with _pytest.raises(AnnouncementError):
            _a.decode(_with(bad))
