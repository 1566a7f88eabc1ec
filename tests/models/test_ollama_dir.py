"""OllamaDir: Ollama's models directory as a store, read, served, installed into and attacked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from meshollama.errors import BadRequest
from meshollama.models import manifest as mf
from meshollama.models import ollama_dir
from meshollama.models.manifest import Layer, Manifest, blob_filename, sha256_digest
from meshollama.models.ollama_dir import OllamaDir, find_models_dir
from meshollama.models.store import PARTIAL_DIR, Store

# --- helpers shared with the other tests of this package ----------------------------------------------


def make_gguf(path: Path, arch: str = "llama", file_type: int = 2, salt: bytes = b"") -> Path:
    """A tiny valid GGUF v3: architecture, file type, one 4x8 tensor; ``salt`` makes other bytes."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    kv = s("general.architecture") + struct.pack("<I", 8) + s(arch)
    kv += s("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", file_type)
    tensor = s("w") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 8) + struct.pack("<IQ", 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 2) + kv + tensor + b"\0" * 32 + salt)
    return path


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def transfer(src: Store, dst: Store, name: str, dest: str | None = None) -> Manifest:
    """What a pull does: every blob ``dst`` lacks through its partial dir, verified, then install."""
    m = src.manifest(name)
    assert m is not None, name
    for layer in m.blobs():
        if dst.has_blob(layer.digest):
            continue
        data = src.blob(layer.digest)
        assert data is not None, layer
        part = dst.partial_dir() / blob_filename(layer.digest)
        if isinstance(data, Path):
            shutil.copyfile(data, part)
        else:
            part.write_bytes(data)
        assert file_digest(part) == layer.digest and part.stat().st_size == layer.size
        dst.commit_blob(layer.digest, part)
    dst.install(dest or name, m)
    return m


def put_model(root: Path, relpath: str, blobs: list[tuple[str, bytes]], config: bytes | None = b'{"x":1}\n',
              ) -> Manifest:
    """Write blobs and a manifest into an Ollama models dir by hand; ``relpath`` is under manifests/."""
    layers = []
    for media, data in blobs:
        layers.append(Layer(sha256_digest(data), len(data), media))
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / blob_filename(sha256_digest(data))).write_bytes(data)
    cfg = None
    if config is not None:
        cfg = Layer(sha256_digest(config), len(config), mf.CONFIG_MEDIA_TYPE)
        (root / "blobs" / blob_filename(cfg.digest)).write_bytes(config)
    m = mf.build(cfg, layers)
    path = root / "manifests" / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.raw)
    return m


WEIGHTS = b"GGUF\x03\x00\x00\x00 not really weights"
TEMPLATE = b"{{ .Prompt }}"


@pytest.fixture
def od(tmp_path: Path) -> OllamaDir:
    return OllamaDir(tmp_path / "ollama")


@pytest.fixture
def held(od: OllamaDir) -> Manifest:
    return put_model(od.root, "registry.ollama.ai/library/smollm2/135m",
                     [(mf.MODEL, WEIGHTS), (mf.TEMPLATE, TEMPLATE)])


# --- reading and serving ---------------------------------------------------------------------------------


def test_reads_by_any_spelling_and_serves_what_it_holds(od: OllamaDir, held: Manifest) -> None:
    assert isinstance(od, Store) and od.kind == "ollama"
    for name in ("smollm2:135m", "SmolLM2:135M", "library/smollm2:135m", "registry.ollama.ai/library/SMOLLM2:135m",
                 "https://registry.ollama.ai/library/smollm2:135m"):
        assert od.manifest(name) == held, name
    assert od.manifest("smollm2") is None and od.manifest("smollm2:136m") is None
    assert od.models() == [("smollm2:135m", held)]
    for layer in held.blobs():
        path = od.blob(layer.digest)
        assert isinstance(path, Path) and path.stat().st_size == layer.size and od.has_blob(layer.digest)
    assert od.blob(held.layers[0].digest).read_bytes() == WEIGHTS


def test_models_lists_shortest_names_and_skips_what_it_cannot_read(od: OllamaDir, held: Manifest, caplog) -> None:
    other = put_model(od.root, "example.com:5000/me/Mine/v1", [(mf.MODEL, b"GGUF other")], config=None)
    put_model(od.root, "registry.ollama.ai/me/x/latest", [(mf.MODEL, b"GGUF x")])
    (od.root / "manifests/registry.ollama.ai/library/broken").mkdir(parents=True)
    (od.root / "manifests/registry.ollama.ai/library/broken/latest").write_text("{not json")
    (od.root / "manifests/registry.ollama.ai/library/smollm2/.partial-123").write_bytes(held.raw)
    (od.root / "manifests/registry.ollama.ai/library/bad name/latest").parent.mkdir(parents=True)
    (od.root / "manifests/registry.ollama.ai/library/bad name/latest").write_bytes(held.raw)
    (od.root / "manifests/stray-file").write_text("x")
    got = dict(od.models())
    assert sorted(got) == ["example.com:5000/me/Mine:v1", "me/x:latest", "smollm2:135m"]
    assert got["example.com:5000/me/Mine:v1"] == other and other.config is None
    assert "broken" in caplog.text
    assert od.manifest("example.com:5000/me/mine:V1") == other


def test_round_trip_into_a_second_store_keeps_the_digest(tmp_path: Path, od: OllamaDir, held: Manifest) -> None:
    other = OllamaDir(tmp_path / "other")
    transfer(od, other, "SmolLM2:135m")
    copy = other.manifest("smollm2:135m")
    assert copy is not None and copy.digest == held.digest and copy.raw == held.raw
    assert (other.root / "manifests/registry.ollama.ai/library/SmolLM2/135m").read_bytes() == held.raw
    assert other.models() == [("SmolLM2:135m", held)]
    assert not list(other.partial_dir().iterdir())
    for layer in held.blobs():
        assert other.blob(layer.digest).read_bytes() == od.blob(layer.digest).read_bytes()
    # a second install under another spelling rewrites the file already there
    other.install("smollm2:135M", held)
    assert [p.name for p in (other.root / "manifests/registry.ollama.ai/library").iterdir()] == ["SmolLM2"]


def test_install_needs_every_blob_committed(od: OllamaDir, tmp_path: Path) -> None:
    m = mf.build(None, [Layer(sha256_digest(b"absent"), 6, mf.MODEL)])
    with pytest.raises(BadRequest, match="missing"):
        od.install("x", m)
    held = put_model(od.root, "registry.ollama.ai/library/y/latest", [(mf.MODEL, WEIGHTS)])
    wrong = mf.build(held.config, [Layer(held.layers[0].digest, held.layers[0].size + 1, mf.MODEL)])
    with pytest.raises(BadRequest, match="wrong size"):
        od.install("x", wrong)
    assert od.manifest("x") is None


def test_commit_blob_moves_a_verified_file(od: OllamaDir, tmp_path: Path) -> None:
    part = od.partial_dir() / "sha256-part"
    assert part.parent == od.root / PARTIAL_DIR
    part.write_bytes(b"data")
    digest = sha256_digest(b"data")
    od.commit_blob(digest, part)
    assert not part.exists() and (od.root / "blobs" / blob_filename(digest)).read_bytes() == b"data"
    assert od.has_blob(digest) and od.blob(digest) is None  # no manifest names it yet
    link = od.partial_dir() / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError):
        od.commit_blob(sha256_digest(b"elsewhere"), link)
    with pytest.raises(BadRequest):
        od.commit_blob("sha256:../../x", part)
    assert od.free_bytes() > 0


# --- attacks -----------------------------------------------------------------------------------------


BAD_DIGESTS = ["../../etc/passwd", "sha256:../x", "/etc/passwd", "sha256:" + "A" * 64, "sha256-" + "a" * 64,
               "sha256:" + "a" * 63, "sha256:" + "a" * 64 + "/", "sha256:" + "a" * 64 + "\n", "", None, 7]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_malformed_digests_are_refused(od: OllamaDir, held: Manifest, digest) -> None:
    # even a file with exactly that name in blobs/
    if isinstance(digest, str) and digest.startswith("sha256-"):
        (od.root / "blobs" / digest).write_bytes(WEIGHTS)
    assert od.blob(digest) is None and not od.has_blob(digest)


def test_uppercase_hex_of_a_held_blob_is_refused(od: OllamaDir, held: Manifest) -> None:
    good = held.layers[0].digest
    assert od.blob(good) is not None and od.blob("sha256:" + good[7:].upper()) is None


def test_only_blobs_a_held_manifest_names_are_served(od: OllamaDir, held: Manifest, tmp_path: Path) -> None:
    stray = od.root / "blobs" / blob_filename(sha256_digest(b"stray"))
    stray.write_bytes(b"stray")
    assert od.blob(sha256_digest(b"stray")) is None
    # a manifest that is no model of this store does not count: outside manifests/, or unparsable
    put_model(tmp_path / "elsewhere", "h/n/m/t", [(mf.MODEL, b"stray")])
    assert od.blob(sha256_digest(b"stray")) is None


def test_a_symlinked_blob_is_not_served(od: OllamaDir, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    put_model(od.root, "registry.ollama.ai/library/m/latest", [(mf.MODEL, b"secret")])
    blob = od.root / "blobs" / blob_filename(sha256_digest(b"secret"))
    blob.unlink()
    blob.symlink_to(secret)
    assert od.blob(sha256_digest(b"secret")) is None and not od.has_blob(sha256_digest(b"secret"))


@pytest.mark.parametrize("name", ["..", "../x", "../../etc/passwd", "/etc/passwd", "library/..:x", "a/../../b",
                                  "x:..", "h/../m", "..:latest", ".hidden", "x/y/z/w", "", "a b"])
def test_names_with_dots_or_slashes_are_refused(od: OllamaDir, held: Manifest, name: str) -> None:
    assert od.manifest(name) is None and od.find_manifest(name) is None
    with pytest.raises(BadRequest):
        od.install(name, held)


def test_a_symlink_out_of_manifests_is_neither_read_nor_written(od: OllamaDir, held: Manifest,
                                                                 tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    put_model(outside, "registry.ollama.ai/library/evil/latest", [(mf.MODEL, b"evil")])
    (od.root / "manifests/registry.ollama.ai/library/evil").symlink_to(
        outside / "manifests/registry.ollama.ai/library/evil")
    (od.root / "manifests/sneaky").symlink_to(outside)
    assert od.manifest("evil") is None and [n for n, _ in od.models()] == ["smollm2:135m"]
    assert od.blob(sha256_digest(b"evil")) is None
    with pytest.raises(BadRequest, match="leaves"):
        od.install("evil:v2", held)
    with pytest.raises(BadRequest, match="leaves"):
        od.install("sneaky/ns/m:t", held)
    assert not (outside / "manifests/registry.ollama.ai/library/evil/v2").exists()
    assert not (outside / "ns").exists()


# --- atomicity ---------------------------------------------------------------------------------------


def test_an_install_that_never_renames_leaves_nothing_visible(od: OllamaDir, held: Manifest, monkeypatch) -> None:
    def boom(*args) -> None:
        raise OSError("disk gone")

    new = put_model(od.root, "registry.ollama.ai/library/tmp/latest", [(mf.MODEL, b"GGUF new")])
    (od.root / "manifests/registry.ollama.ai/library/tmp/latest").unlink()
    monkeypatch.setattr(ollama_dir.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        od.install("fresh", new)
    with pytest.raises(OSError, match="disk gone"):
        od.install("smollm2:135m", new)
    monkeypatch.undo()
    assert od.manifest("fresh") is None and od.manifest("smollm2:135m") == held
    leftovers = [p for p in (od.root / "manifests").rglob("*") if p.is_file()]
    assert leftovers == [od.root / "manifests/registry.ollama.ai/library/smollm2/135m"]


def test_manifest_file_is_written_whole_with_readable_permissions(od: OllamaDir, held: Manifest) -> None:
    od.install("me/thing:v1", held)
    path = od.root / "manifests/registry.ollama.ai/me/thing/v1"
    assert path.read_bytes() == held.raw and json.loads(path.read_bytes())["schemaVersion"] == 2
    assert path.stat().st_mode & 0o777 == 0o644


# --- where the directory is ---------------------------------------------------------------------------


def test_find_models_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_models_dir("~/m", {}) == tmp_path / "home" / "m"
    assert find_models_dir(None, {"OLLAMA_MODELS": "/srv/models"}) == Path("/srv/models")
    assert find_models_dir(None, {"HOME": str(tmp_path)}) == tmp_path / ".ollama" / "models"
    system = tmp_path / "usr-share"
    system.mkdir()
    monkeypatch.setattr(ollama_dir, "SYSTEM_MODELS_DIR", system)
    monkeypatch.setattr(ollama_dir.sys, "platform", "linux")
    assert find_models_dir(None, {"HOME": str(tmp_path)}) == system
    (tmp_path / ".ollama" / "models").mkdir(parents=True)
    assert find_models_dir(None, {"HOME": str(tmp_path)}) == tmp_path / ".ollama" / "models"
    monkeypatch.setattr(ollama_dir.sys, "platform", "darwin")
    assert find_models_dir(None, {"HOME": str(tmp_path / "nobody")}) == tmp_path / "nobody" / ".ollama" / "models"
    assert os.environ["HOME"] == str(tmp_path / "home")
