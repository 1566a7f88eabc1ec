"""`make demo` (scripts/demo.py): three embedded nodes form a mesh, answer, and stop cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from meshollama.backends.embedded import available, default_model_path

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.embedded,
    pytest.mark.skipif(not available() or default_model_path() is None,
                       reason="llama-cpp-python or the SmolLM2 model is not installed (run make install)"),
]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_demo_mesh_answers_and_stops_on_ctrl_c(tmp_path):
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "scripts/demo.py", "--base-port", "0", "--data", str(tmp_path / "demo")],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:
        with trio.fail_after(240):
            while "mesh ready" not in out.read_text():
                assert proc.poll() is None, out.read_text()
                await trio.sleep(0.2)
            infos = [json.loads((tmp_path / "demo" / f"node{i}" / "node.json").read_text()) for i in (1, 2, 3)]
            pids = [info["pid"] for info in infos]
            async with httpx.AsyncClient(timeout=120) as client:
                r = await client.post(infos[0]["api_url"] + "/api/generate", json={
                    "model": "smollm2:135m", "prompt": "hi", "stream": False, "options": {"num_predict": 4}})
            assert r.status_code == 200, r.text
            assert r.headers["x-meshollama-peer"] in {info["peer_id"] for info in infos}
            while "load: " not in out.read_text():  # the live table is printed
                await trio.sleep(0.2)
        with trio.fail_after(60):
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            assert await proc.wait() == 0, out.read_text()
        assert "demo stopped" in out.read_text()
        assert not any(alive(pid) for pid in pids), "a node outlived the demo"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
