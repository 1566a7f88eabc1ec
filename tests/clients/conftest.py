"""One real embedded node, and one gateway-only node joined to it over the mesh, for the whole session.

The replays and the client-library tests share them: starting the model is
the slow part, and every test is one request. The nodes are started with the
project's own helpers (``tests/integration/cluster.py``: OS-chosen ports,
temp data dirs, processes killed on exit), run in a trio loop on a thread of
their own so that plain synchronous tests (and the synchronous client
libraries) can use them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
import threading
import warnings
from pathlib import Path

import httpx
import pytest
import trio

from meshollama.backends.embedded import available, default_model_path

from tests.integration.cluster import cluster

# Client libraries must not phone home (litellm fetches its model price list at
# import unless told to use its bundled copy), and no proxy may sit between
# them and 127.0.0.1. Set before any test module imports them.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_TELEMETRY", "False")
for _var in ("OLLAMA_HOST", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
             "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

MODEL = "smollm2:135m"
RECORDINGS = Path(__file__).parent / "recordings"
START_TIMEOUT = 180  # both nodes up and the gateway-only node sees the model
# Some recorded bodies leave the answer's length open (Open WebUI's tag and
# follow-up tasks send no num_predict); SmolLM2 at a high temperature can then
# ramble for minutes on two cores. The node's model gets a default num_predict,
# as a Modelfile PARAMETER gives one in Ollama, so that every replay ends; a
# body's own num_predict or max_tokens still wins.
DEFAULT_NUM_PREDICT = 128
REQUEST_TIMEOUT = 180  # one request, the model's first load included

needs_model = pytest.mark.skipif(not available() or default_model_path() is None,
                                 reason="llama-cpp-python or the SmolLM2 model is not installed (run make install)")


def recordings() -> list[tuple[str, dict]]:
    """(test id, recorded request) for every request in every fixture file, in file order."""
    out = []
    for path in sorted(RECORDINGS.glob("*.json")):
        doc = json.loads(path.read_text())
        seen: dict[str, int] = {}
        for req in doc["requests"]:
            n = seen[req["name"]] = seen.get(req["name"], 0) + 1
            name = req["name"] if n == 1 else f"{req['name']}#{n}"
            out.append((f"{doc['client']}-{doc['version']}:{name}", req))
    return out


class Mesh:
    """Two ``meshollama start`` processes in a trio loop on a background thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.urls: dict[str, str] = {}
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._token = None
        self._stop: trio.Event | None = None
        self._pids: list[int] = []
        self._thread = threading.Thread(target=self._run, name="mesh", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(START_TIMEOUT + 30):
            raise AssertionError("the nodes did not start in time")
        if self.error is not None:
            raise AssertionError(f"the nodes did not start: {self.error!r}") from self.error

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(30)
        for pid in self._pids:  # only if the loop could not kill them itself
            try:
                os.kill(pid, 9)
            except OSError:
                pass

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with cluster(self.tmp) as c:
            with trio.fail_after(START_TIMEOUT):
                direct = await c.start("direct", "--backend", "embedded")
                self._pids.append(direct.proc.pid)
                gateway = await c.start("gateway", "--backend", "none", bootstrap=direct)
                self._pids.append(gateway.proc.pid)

                async def gateway_sees_the_model():
                    r = await c.client.get(gateway.api + "/api/tags")
                    return r.status_code == 200 and MODEL in {m["name"] for m in r.json()["models"]}

                await c.wait_until(gateway_sees_the_model)
            self.urls = {"direct": direct.api, "mesh": gateway.api}
            self.ready.set()
            await self._stop.wait()
        self._pids.clear()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("clients"))
    try:
        m.start()
        r = httpx.post(m.urls["direct"] + "/api/create", timeout=60, json={
            "model": MODEL, "from": MODEL, "parameters": {"num_predict": DEFAULT_NUM_PREDICT}, "stream": False})
        if r.status_code != 200:  # the replays still run; only the open-ended ones may then time out
            warnings.warn(f"/api/create {MODEL} with a default num_predict: {r.status_code} {r.text}", stacklevel=1)
        # Load the model once, so the first test's timeout is not spent on it.
        httpx.post(m.urls["direct"] + "/api/generate", json={"model": MODEL}, timeout=REQUEST_TIMEOUT)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="session")
def node(mesh) -> str:
    """The API URL of the node that serves the model itself."""
    return mesh.urls["direct"]
