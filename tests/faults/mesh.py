"""Shared pieces of the real-process fault tests (``test_faults``).

* :func:`mesh` starts a gateway-only node A and holder nodes, each holder
  with its own stand-in Ollama serving the same model with the same ``text``
  (the fake's digest depends on the model name only, so every holder has the
  same digest and a broken answer may resume on any of them), and waits until
  A routes to all of them;
* :class:`FakeSlot` runs one fake under its own cancel scope, so a test can
  stop a holder's Ollama mid-stream and start a new one on the same port;
* :func:`send_watching` is :func:`~tests.faults.fates.send` with a hook: after
  the first N lines of the answer it calls back (to kill or freeze the peer
  serving it, named by the ``x-meshollama-peer`` header), and it keeps the
  response headers (``Retry-After``);
* :func:`payload` gives a streamed request for each generation path.

Everything waits for conditions, bounded by the caller's ``fail_after``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.fakes.fake_ollama import FakeOllama, serve_fake
from tests.integration.cluster import Cluster, NodeProc, cluster

from .fates import Outcome, send

PEER = "x-meshollama-peer"
MODEL = "relay:latest"

# The three streamed generation paths a broken answer resumes on.
PATHS = ("/api/chat", "/v1/chat/completions", "/api/generate")


def payload(path: str, model: str = MODEL) -> dict[str, Any]:
    """A streamed request on ``path`` (``/api/generate`` non-raw: it resumes as a chat)."""
    if path == "/api/generate":
        return {"model": model, "prompt": "count", "stream": True}
    return {"model": model, "messages": [{"role": "user", "content": "count"}], "stream": True}


# --- fakes that can be stopped and started again --------------------------------


class FakeSlot:
    """One stand-in Ollama under its own cancel scope: :meth:`stop` closes its
    listener and every connection (a crashed or restarted Ollama), :meth:`start`
    serves a fresh one on the same port."""

    def __init__(self, nursery: trio.Nursery, models: list[str], **kw: Any) -> None:
        self.nursery = nursery
        self.models = models
        self.kw = kw
        self.fake: FakeOllama | None = None
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeOllama:
        self.fake = await self.nursery.start(self._run)
        self.port = self.fake.port
        return self.fake

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._stopped = stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                await serve_fake(self.models, self.port, task_status=task_status, **self.kw)
        finally:
            stopped.set()

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._stopped.wait()
            self._scope = None


# --- a mesh of holders behind a gateway-only node -------------------------------


@dataclass
class Mesh:
    c: Cluster
    a: NodeProc  # gateway only (--backend none): every request is routed
    holders: list[NodeProc]
    slots: list[FakeSlot]
    client: httpx.AsyncClient  # for requests; keep-alive off, the deadline bounds each
    by_id: dict[str, int] = field(default_factory=dict)  # peer id -> index in holders

    def holder(self, peer_id: str) -> tuple[NodeProc, FakeSlot]:
        i = self.by_id[peer_id]
        return self.holders[i], self.slots[i]

    def name(self, peer_id: str | None) -> str:
        if peer_id in self.by_id:
            return self.holders[self.by_id[peer_id]].name
        return str(peer_id)

    def log(self, *nodes: NodeProc) -> str:
        nodes = nodes or (self.a, *self.holders)
        return "\n".join(f"--- {n.name}.log (tail)\n{n.log()[-2500:]}" for n in nodes)

    async def peer_states(self, model: str = MODEL) -> dict[str, str]:
        """A's view: holder peer id -> state, for peers that list ``model``."""
        out = {}
        for p in await self.c.peers(self.a):
            if any(m.get("name") == model for m in p.get("models", [])):
                out[p["peer_id"]] = p.get("state", "?")
        return out

    async def wait_routable(self, nodes: list[NodeProc] | None = None, model: str = MODEL) -> None:
        """Until A sees each of ``nodes`` (all holders by default) alive and holding ``model``."""
        nodes = self.holders if nodes is None else nodes

        async def ready() -> bool:
            states = await self.peer_states(model)
            return all(states.get(n.peer_id) == "alive" for n in nodes)

        await self.c.wait_until(ready)


@asynccontextmanager
async def mesh(tmp_path: Path, holders: int = 2, *, fake_kw: dict | None = None, models: list[str] | None = None,
               extra_models: dict[int, list[str]] | None = None, a_args: tuple[str, ...] = (),
               a_env: dict | None = None, holder_args: tuple[str, ...] = (), holder_env: dict | None = None):
    """Gateway node A plus ``holders`` holder nodes, each with its own fake;
    ``extra_models[i]`` are models only holder i has."""
    models = models or [MODEL]
    async with trio.open_nursery() as fn, cluster(tmp_path) as c:
        client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0),
                                   limits=httpx.Limits(max_keepalive_connections=0))
        try:
            slots = []
            for i in range(holders):
                slot = FakeSlot(fn, models + (extra_models or {}).get(i, []), name=f"H{i}", **(fake_kw or {}))
                await slot.start()
                slots.append(slot)
            a = await c.start("a", "--backend", "none", *a_args, env=a_env)
            nodes = []
            for i, slot in enumerate(slots):
                name = "bcdefgh"[i]
                nodes.append(await c.start(name, "--backend", "ollama", "--ollama-url", slot.url, *holder_args,
                                           bootstrap=a, env=holder_env))
            m = Mesh(c, a, nodes, slots, client, {n.peer_id: i for i, n in enumerate(nodes)})
            with trio.fail_after(30):
                await m.wait_routable()
            yield m
        finally:
            await client.aclose()
            fn.cancel_scope.cancel()


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- one request, watched --------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One request's outcome, with what the client saw of the response head."""

    outcome: Outcome
    headers: httpx.Headers | None = None
    first_peer: str | None = None  # x-meshollama-peer: the peer that started the answer

    @property
    def fate(self):
        return self.outcome.fate

    def __str__(self) -> str:
        return f"{self.outcome} first_peer={self.first_peer} peers={self.outcome.peers}"


async def send_watching(client: httpx.AsyncClient, api: str, path: str, body: Any, *, deadline: float,
                        after_lines: int | None = None,
                        on_lines: Callable[[httpx.Headers], Awaitable[None]] | None = None) -> Sent:
    """POST ``body`` to ``api + path`` and classify the answer, as ``fates.send``
    does; once ``after_lines`` non-empty lines of the body arrived, await
    ``on_lines(headers)`` (the stream keeps being read afterwards)."""
    head: list[httpx.Headers] = []
    fired = on_lines is None

    async def watch(body_so_far: bytearray) -> None:
        nonlocal fired
        if not fired and _lines(body_so_far) >= after_lines:
            fired = True
            await on_lines(head[0])

    outcome = await send(client, path, body, deadline=deadline, url=api + path, on_head=head.append, on_chunk=watch)
    headers = head[0] if head else None
    return Sent(outcome, headers, headers.get(PEER) if headers is not None else None)


def _lines(body: bytes) -> int:
    return sum(1 for ln in body.split(b"\n") if ln.strip() and not ln.startswith(b"event:"))


def signal_peer(m: Mesh, sig: int) -> Callable[[httpx.Headers], Awaitable[None]]:
    """An ``on_lines`` hook: send ``sig`` to the holder serving the answer, and remember which."""
    hit: list[NodeProc] = []

    async def hook(headers: httpx.Headers) -> None:
        node, _ = m.holder(headers[PEER])
        hit.append(node)
        m.c.signal(node, sig)

    hook.hit = hit  # type: ignore[attr-defined]
    return hook

