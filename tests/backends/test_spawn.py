"""ManagedOllama with a fake `ollama` executable; Backoff as a pure function."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import trio

from meshollama.backends.spawn import Backoff, ManagedOllama
from meshollama.errors import ConfigError

FAKE_OLLAMA = """\
#!{python}
# A stand-in `ollama` binary: logs its starts, then behaves as FAKE_OLLAMA_MODE says.
import os, signal, sys, time

log = os.environ["FAKE_OLLAMA_LOG"]
mode = os.environ.get("FAKE_OLLAMA_MODE", "exit")

def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")

if mode == "forever":
    signal.signal(signal.SIGTERM, lambda *_: (note(f"term {{os.getpid()}}"), sys.exit(0)))
elif mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
env = " ".join(f"{{k}}={{os.environ.get(k, '')}}" for k in ("OLLAMA_HOST", "OLLAMA_NUM_PARALLEL"))
note(f"start {{os.getpid()}} {{' '.join(sys.argv[1:])}} {{env}}")
if mode == "exit":
    time.sleep(float(os.environ.get("FAKE_OLLAMA_LIFETIME", "0")))
    sys.exit(3)
while True:
    time.sleep(60)
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ollama"
    exe.write_text(FAKE_OLLAMA.format(python=sys.executable))
    exe.chmod(0o755)
    return bindir


def child_env(fake_bin: Path, log: Path, mode: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "FAKE_OLLAMA_"))}
    env.update(PATH=f"{fake_bin}{os.pathsep}{env.get('PATH', '')}", FAKE_OLLAMA_LOG=str(log), FAKE_OLLAMA_MODE=mode)
    env.update(extra)
    return env


async def lines(log: Path, prefix: str, count: int) -> list[str]:
    """Wait until ``log`` holds ``count`` lines starting with ``prefix`` (the child writes them)."""
    while True:
        found = [ln for ln in (log.read_text().splitlines() if log.exists() else []) if ln.startswith(prefix)]
        if len(found) >= count:
            return found
        await trio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- Backoff (pure) ----------------------------------------------------------


@pytest.mark.parametrize(
    "uptimes, delays",
    [
        ([0, 0, 0, 0, 0, 0, 0, 0], [0.5, 1, 2, 4, 8, 16, 30, 30]),
        ([0, 0, 0, 61, 0], [0.5, 1, 2, 0.5, 1]),  # a run of 60s+ resets the backoff
        ([60, 60, 60], [0.5, 0.5, 0.5]),
        ([59.9, 59.9], [0.5, 1]),
    ],
)
def test_backoff(uptimes, delays):
    backoff = Backoff(0.5, 30.0, 60.0)
    assert [backoff.after_exit(u) for u in uptimes] == delays


# --- with a fake binary ------------------------------------------------------


def test_missing_binary_is_a_config_error(tmp_path):
    managed = ManagedOllama("ollama", env={"PATH": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        managed.resolve()
    assert err.value.key == "ollama.binary"
    assert "'ollama' not found on PATH; install Ollama or drop --spawn-ollama" in str(err.value)


async def test_missing_binary_fails_start(tmp_path):
    managed = ManagedOllama("ollama", env={"PATH": str(tmp_path)})
    with trio.fail_after(5):
        with pytest.raises(ConfigError):
            await managed.serve()


async def test_restarts_with_backoff(fake_bin, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meshollama.backend.spawn")
    log = tmp_path / "ollama.log"
    env_before = dict(os.environ)
    managed = ManagedOllama(
        "ollama",
        "127.0.0.1:12345",
        num_parallel=3,
        env=child_env(fake_bin, log, "exit"),
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(managed.serve)
            starts = await lines(log, "start", 5)
            nursery.cancel_scope.cancel()
    assert managed.delays[:4] == [0.05, 0.1, 0.2, 0.2]
    assert managed.starts >= 5
    assert all(s.endswith("serve OLLAMA_HOST=127.0.0.1:12345 OLLAMA_NUM_PARALLEL=3") for s in starts)
    assert len({s.split()[1] for s in starts}) == 5  # five different processes
    assert dict(os.environ) == env_before  # the child's env was passed, ours untouched
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("exited (code 3)" in w and "restart 1 in 0.1s" in w for w in warnings)


async def test_backoff_resets_after_a_stable_run(fake_bin, tmp_path):
    log = tmp_path / "ollama.log"
    managed = ManagedOllama(
        "ollama",
        env=child_env(fake_bin, log, "exit", FAKE_OLLAMA_LIFETIME="0.3"),
        backoff_initial=0.05,
        stable_after=0.2,
    )
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(managed.serve)
            await lines(log, "start", 3)
            nursery.cancel_scope.cancel()
    assert managed.delays[:2] == [0.05, 0.05]


async def test_cancel_stops_the_child_with_sigterm(fake_bin, tmp_path):
    log = tmp_path / "ollama.log"
    managed = ManagedOllama("ollama", env=child_env(fake_bin, log, "forever"), stop_timeout=10)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(managed.serve)
            (start,) = await lines(log, "start", 1)
            pid = int(start.split()[1])
            assert managed.process is not None and managed.process.pid == pid
            nursery.cancel_scope.cancel()
    assert await lines(log, "term", 1) == [f"term {pid}"]
    assert managed.process is None and gone(pid)
    assert managed.starts == 1 and managed.delays == []


async def test_child_ignoring_sigterm_is_killed_after_the_deadline(fake_bin, tmp_path):
    log = tmp_path / "ollama.log"
    managed = ManagedOllama("ollama", env=child_env(fake_bin, log, "stubborn"), stop_timeout=0.3)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(managed.serve)
            (start,) = await lines(log, "start", 1)
            began = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - began >= 0.3
    assert gone(int(start.split()[1]))
