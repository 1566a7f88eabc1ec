"""Models across LAN hosts: a user on host p runs ``meshollama pull`` and gets
the model from host a over the LAN, then ``meshollama replicate --copies 3``
makes host b fetch a copy from the two that hold it."""

from __future__ import annotations

import json
import sys

import pytest
import trio

from tests.integration.modelstores import write_model
from tests.multihost.nodes import http, peers, start_fake, start_node, wait_for

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


async def _holder_count(net, host, model: str) -> int:
    view = await peers(net, host)
    return sum(1 for p in view.values() if p.get("state") == "alive"
               and any(m["name"] == model for m in p.get("models", [])))


async def test_pull_then_replicate_across_hosts(net, tmp_path):
    with trio.fail_after(240):
        _, (ah, bh, ph) = net.lan("198.18.40", ["a", "b", "p"])
        stored = write_model(tmp_path / "a-models", "tiny:1b", 20 * MIB)
        env = {}
        for host, name in ((ah, "a"), (bh, "b"), (ph, "p")):
            models_dir = tmp_path / f"{name}-models"
            models_dir.mkdir(exist_ok=True)
            await start_fake(net, host, tmp_path, [], name, extra=("--models-dir", str(models_dir)))
            env[name] = {"MESHOLLAMA_OLLAMA_MODELS_DIR": str(models_dir), "MESHOLLAMA_OLLAMA_REFRESH_INTERVAL": "0.5",
                         "MESHOLLAMA_MODELS_MIN_FREE_BYTES": "0"}
        a = await start_node(net, ah, tmp_path, "a", "--no-mdns", "--backend", "ollama", env=env["a"])
        join = a.join_line().split()[2:]
        await start_node(net, bh, tmp_path, "b", *join, "--no-mdns", "--backend", "ollama", env=env["b"])
        p = await start_node(net, ph, tmp_path, "p", *join, "--no-mdns", "--backend", "ollama", env=env["p"])

        async def p_sees_a_holding() -> bool:
            return await _holder_count(net, ph, "tiny:1b") == 1

        await wait_for(p_sees_a_holding)

        # As a user would: the CLI on host p, with its progress bar.
        cli = [sys.executable, "-m", "meshollama", "pull", "tiny:1b", "--data-dir", str(p.data_dir)]
        done = await net.run(ph, cli, timeout=120)
        out = done.stdout.decode(errors="replace")
        assert done.returncode == 0, out + done.stderr.decode(errors="replace")
        assert "success" in out and a.peer_id[:8] in out, out
        manifest = ("manifests", "registry.ollama.ai", "library", "tiny", "1b")
        assert (tmp_path / "p-models").joinpath(*manifest).read_bytes() == \
            (tmp_path / "a-models").joinpath(*manifest).read_bytes()
        blob = tmp_path / "p-models" / "blobs" / stored.model_layer.digest.replace(":", "-")
        assert blob.read_bytes() == stored.model_bytes

        rep = [sys.executable, "-m", "meshollama", "replicate", "tiny:1b", "--copies", "3",
               "--data-dir", str(p.data_dir)]
        done = await net.run(ph, rep, timeout=30)
        assert done.returncode == 0, done.stderr.decode(errors="replace")

        async def three_copies() -> bool:
            return await _holder_count(net, ah, "tiny:1b") == 3

        await wait_for(three_copies)
        assert (tmp_path / "b-models").joinpath(*manifest).exists()

        async def a_lists_the_target() -> dict | None:
            # a takes the target from p's announcement, and counts the copies, at its
            # replicator's next look (every few seconds, on the shared ticks); b's copy can be
            # announced before that.
            listed = await http(net, ah, "GET", "/api/mesh/models")
            row = next(m for m in json.loads("".join(listed["lines"]))["models"] if m["model"] == "tiny:1b")
            return row if row["copies_target"] == 3 and row["copies"] == 3 else None

        row = await wait_for(a_lists_the_target)
        assert len(row["holders"]) == 3
        done = await net.run(ah, [sys.executable, "-m", "meshollama", "models", "--data-dir", str(a.data_dir)])
        assert "tiny:1b" in done.stdout.decode() and "3/3" in done.stdout.decode(), done.stdout.decode()
