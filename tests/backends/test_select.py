"""Backend selection: the pure decision table, then building objects from config."""

from __future__ import annotations

import logging
import socket
import sys
import types
from functools import partial
from types import SimpleNamespace

import pytest
import trio

from meshollama.backends import select
from meshollama.backends.base import NoBackend
from meshollama.backends.ollama import OllamaBackend
from meshollama.backends.select import (
    Decision,
    create_backend,
    decide,
    probe_ollama,
    probe_ollama_blocking,
    select_backend,
)
from meshollama.backends.spawn import ManagedOllama
from meshollama.config import load_config
from meshollama.errors import ConfigError

from tests.fakes.fake_ollama import serve_fake


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def config(kind: str = "auto", *, url: str | None = None, spawn: bool = False, binary: str = "ollama"):
    return SimpleNamespace(
        backend=SimpleNamespace(kind=kind),
        ollama=SimpleNamespace(
            url=url or free_url(),
            num_parallel=2,
            spawn=spawn,
            binary=binary,
            refresh_interval=7.0,
            probe_timeout=0.5,
        ),
        embedded=SimpleNamespace(marker="embedded-config"),
        gateway=SimpleNamespace(connect_timeout=3.5),
    )


# --- the decision (pure) -----------------------------------------------------


@pytest.mark.parametrize(
    "kind, spawn, up, emb, want_kind, want_spawn",
    [
        ("none", False, None, True, "none", False),
        ("ollama", False, None, True, "ollama", False),
        ("ollama", False, False, False, "ollama", False),  # waits for Ollama to come up
        ("ollama", True, False, False, "ollama", True),
        ("ollama", True, True, False, "ollama", False),  # one already answers: use it
        ("embedded", False, True, True, "embedded", False),
        ("auto", False, True, True, "ollama", False),
        ("auto", False, False, True, "embedded", False),
        ("auto", False, None, True, "embedded", False),
        ("auto", False, False, False, "none", False),
        ("auto", True, False, True, "ollama", True),
        ("auto", True, True, True, "ollama", False),
    ],
)
def test_decide(kind, spawn, up, emb, want_kind, want_spawn):
    d = decide(kind, spawn=spawn, ollama_up=up, embedded_ok=emb)
    assert (d.kind, d.spawn) == (want_kind, want_spawn)
    assert d.reason


@pytest.mark.parametrize(
    "kind, spawn, emb, key",
    [
        ("gpu", False, True, "backend.kind"),
        ("embedded", False, False, "backend.kind"),
        ("embedded", True, True, "ollama.spawn"),
        ("none", True, True, "ollama.spawn"),
    ],
)
def test_decide_rejects(kind, spawn, emb, key):
    with pytest.raises(ConfigError) as err:
        decide(kind, spawn=spawn, ollama_up=False, embedded_ok=emb)
    assert err.value.key == key


def test_auto_without_anything_says_what_to_do():
    d = decide("auto", spawn=False, ollama_up=False, embedded_ok=False)
    assert d == Decision("none", False, d.reason)
    assert "--spawn-ollama" in d.reason and "meshollama[embedded]" in d.reason


# --- building ----------------------------------------------------------------


def test_none():
    selected = create_backend(config("none"))
    assert isinstance(selected.backend, NoBackend) and selected.services == ()


async def test_ollama_settings_are_passed_on():
    cfg = config("ollama", url="http://127.0.0.1:11999/")
    selected = create_backend(cfg)
    backend = selected.backend
    try:
        assert isinstance(backend, OllamaBackend) and backend.kind == "ollama"
        assert backend.url == "http://127.0.0.1:11999" and backend.num_parallel == 2
        assert backend.refresh_interval == 7.0 and backend.probe_timeout == 0.5
        assert backend._client.timeout.connect == 3.5  # gateway.connect_timeout
        assert backend.load().capacity == 2
        assert selected.services == ()
    finally:
        await backend.aclose()


async def test_real_config_object():
    cfg = load_config(env={}, overrides={"backend.kind": "ollama", "ollama.url": free_url()})
    selected = create_backend(cfg)
    assert isinstance(selected.backend, OllamaBackend)
    await selected.backend.aclose()


async def test_auto_finds_a_running_ollama():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await nursery.start(serve_fake)
            selected = await select_backend(config("auto", url=fake.url))
            assert isinstance(selected.backend, OllamaBackend)
            await selected.backend.aclose()
            assert [r.path for r in fake.requests] == ["/api/version"]
            nursery.cancel_scope.cancel()


async def test_auto_with_nothing_is_a_gateway_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(select, "embedded_available", lambda: False)
    with trio.fail_after(10):
        selected = await select_backend(config("auto"))
    assert isinstance(selected.backend, NoBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("serves no models" in w for w in warnings)


async def test_auto_falls_back_to_embedded(monkeypatch):
    made = []

    class EmbeddedBackend:
        kind = "embedded"

        @classmethod
        def from_config(cls, cfg):
            made.append(cfg)
            return cls()

    fake_module = types.ModuleType("meshollama.backends.embedded")
    fake_module.available = lambda: True
    fake_module.EmbeddedBackend = EmbeddedBackend
    monkeypatch.setitem(sys.modules, "meshollama.backends.embedded", fake_module)
    cfg = config("auto")
    with trio.fail_after(10):
        selected = await select_backend(cfg)
    assert isinstance(selected.backend, EmbeddedBackend)
    assert made == [cfg]  # the whole config, so model_dir defaults to <data_dir>/models
    # Asking for it by name works the same, without probing Ollama.
    assert isinstance(create_backend(config("embedded")).backend, EmbeddedBackend)


def test_embedded_unavailable_when_the_module_reports_so(monkeypatch):
    fake_module = types.ModuleType("meshollama.backends.embedded")
    fake_module.available = lambda: False
    monkeypatch.setitem(sys.modules, "meshollama.backends.embedded", fake_module)
    assert select.embedded_available() is False
    with pytest.raises(ConfigError) as err:
        create_backend(config("embedded"))
    assert err.value.key == "backend.kind"


async def test_spawn_adds_a_managed_ollama(tmp_path):
    exe = tmp_path / "my-ollama"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    cfg = config("auto", url="http://127.0.0.1:11977", spawn=True, binary=str(exe))
    with trio.fail_after(10):
        selected = await select_backend(cfg)
    try:
        assert isinstance(selected.backend, OllamaBackend)
        (managed,) = selected.services
        assert isinstance(managed, ManagedOllama)
        assert managed.binary == str(exe) and managed.host_port == "127.0.0.1:11977"
        assert managed.child_env()["OLLAMA_NUM_PARALLEL"] == "2"
    finally:
        await selected.backend.aclose()


def test_spawn_without_the_binary_fails_early(tmp_path):
    cfg = config("ollama", spawn=True, binary=str(tmp_path / "nope"))
    with pytest.raises(ConfigError) as err:
        create_backend(cfg, ollama_up=False)
    assert err.value.key == "ollama.binary"


async def test_spawn_reuses_an_ollama_that_already_answers():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await nursery.start(serve_fake)
            selected = await select_backend(config("ollama", url=fake.url, spawn=True, binary="/nonexistent/ollama"))
            assert isinstance(selected.backend, OllamaBackend) and selected.services == ()
            await selected.backend.aclose()
            nursery.cancel_scope.cancel()


# --- probing -----------------------------------------------------------------


async def test_probe():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fake = await nursery.start(serve_fake)
            assert await probe_ollama(fake.url, 1.0) is True
            assert fake.requests[-1].header("host") == f"127.0.0.1:{fake.port}"
            # The blocking variant needs the fake to run while it blocks: use a thread.
            assert await trio.to_thread.run_sync(partial(probe_ollama_blocking, fake.url, 1.0)) is True
            fake.set(hang_before_first_byte=True, fault_paths=["/api/version"])
            assert await probe_ollama(fake.url, 0.2) is False  # answers too slowly
            fake.clear_faults()
            fake.set(fail_before_first_byte={"status": 200, "body": "not ollama"}, fault_paths=["/api/version"])
            assert await probe_ollama(fake.url, 1.0) is False
            nursery.cancel_scope.cancel()
    assert await probe_ollama(free_url(), 1.0) is False
    assert await probe_ollama("ftp://nope", 1.0) is False
    assert probe_ollama_blocking(free_url(), 1.0) is False
