"""Fakes for gateway tests: a scripted MeshView and scripted upstreams.

A :class:`FakeUpstream` plays :class:`Script` s, one per ``open()`` (the last
one repeats). A script's body is a list of steps: ``bytes`` are sent as one
chunk, :class:`Wait` blocks until the test sets an event, :class:`Break`
fails the stream mid-way, :class:`Hang` blocks forever. The upstream records
what it was asked, what it sent, and how its context ended, and lets tests
wait for any of that without sleeping (:meth:`FakeUpstream.wait_until`).
"""

from __future__ import annotations

import dataclasses

import json
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.config import Config, GatewayConfig, NodeConfig
from meshollama.errors import UpstreamBroken, UpstreamUnavailable
from meshollama.gateway import create_app, serve_gateway
from meshollama.httpmsg import Headers, ProxyRequest, ProxyResponse
from meshollama.mesh.peertable import PeerState, PeerView, Snapshot

NDJSON = (("content-type", "application/x-ndjson"),)
JSON = (("content-type", "application/json; charset=utf-8"),)
SSE = (("content-type", "text/event-stream"),)


@dataclass(frozen=True)
class Wait:
    """Block the body until ``event`` is set."""

    event: trio.Event


@dataclass(frozen=True)
class Break:
    """Fail the body here, as a transport failure mid-stream would."""

    message: str = "stream reset by peer"


@dataclass(frozen=True)
class Hang:
    """Block forever (until cancelled)."""


@dataclass(frozen=True)
class Script:
    status: int = 200
    headers: Headers = NDJSON
    body: Sequence[Any] = ()
    fail: BaseException | None = None  # raised by open() before any answer
    hang_before_head: bool = False


class FakeUpstream:
    """An Upstream whose answers are scripted and whose behaviour is recorded."""

    def __init__(self, name: str, *scripts: Script | Callable[[ProxyRequest], Script]) -> None:
        self.name = name
        self._scripts = list(scripts) or [Script(body=[b'{"done":true}\n'])]
        self.requests: list[ProxyRequest] = []
        self.sent: list[bytes] = []
        self.exits: list[BaseException | None] = []  # how each open() context ended
        self.body_closed_early = 0  # bodies closed before their script ended
        self._changed = trio.Event()

    # -- waiting for conditions ----------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    @property
    def aborted(self) -> int:
        """Contexts left with an exception (cancellation, client gone, ...)."""
        return sum(1 for e in self.exits if e is not None)

    # -- the Upstream interface ----------------------------------------------

    def _next_script(self, request: ProxyRequest) -> Script:
        item = self._scripts.pop(0) if len(self._scripts) > 1 else self._scripts[0]
        return item(request) if callable(item) else item

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        if request.stream is not None:  # a streamed upload: read it as a backend would
            body = b"".join([chunk async for chunk in request.stream])
            request = dataclasses.replace(request, body=body, stream=None)
        self.requests.append(request)
        self._notify()
        script = self._next_script(request)
        try:
            if script.hang_before_head:
                await trio.sleep_forever()
            if script.fail is not None:
                raise script.fail
            yield ProxyResponse(script.status, script.headers, self._body(script))
        except BaseException as exc:
            self.exits.append(exc)
            self._notify()
            raise
        else:
            self.exits.append(None)
            self._notify()

    async def _body(self, script: Script) -> AsyncIterator[bytes]:
        finished = False
        try:
            for step in script.body:
                if isinstance(step, Wait):
                    await step.event.wait()
                elif isinstance(step, Break):
                    raise UpstreamBroken(step.message)
                elif isinstance(step, Hang):
                    await trio.sleep_forever()
                else:
                    self.sent.append(step)
                    self._notify()
                    yield step
            finished = True
        finally:
            if not finished:
                self.body_closed_early += 1
                self._notify()


# --- Ollama-like canned answers -------------------------------------------------


def _lines(*objs: object) -> list[bytes]:
    return [json.dumps(o).encode() + b"\n" for o in objs]


def _sse(*objs: object) -> list[bytes]:
    return [b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs] + [b"data: [DONE]\n\n"]


def ollama_like(request: ProxyRequest) -> Script:
    """A tiny Ollama: plausible answers for what the python clients call."""
    body = json.loads(request.body or b"{}")
    model = body.get("model", "")
    created = "2024-05-01T10:00:00.123456789Z"
    path = request.path.split("?")[0]
    stream = body.get("stream", not path.startswith("/v1/"))
    if path == "/api/chat":
        parts = [
            {"model": model, "created_at": created, "message": {"role": "assistant", "content": w}, "done": False}
            for w in ("Hel", "lo")
        ]
        final = {"model": model, "created_at": created, "message": {"role": "assistant", "content": ""},
                 "done": True, "done_reason": "stop", "eval_count": 2}
        if stream:
            return Script(body=_lines(*parts, final))
        whole = dict(final, message={"role": "assistant", "content": "Hello"})
        return Script(headers=JSON, body=_lines(whole)[0:1])
    if path == "/api/generate":
        parts = [{"model": model, "created_at": created, "response": w, "done": False} for w in ("Hel", "lo")]
        final = {"model": model, "created_at": created, "response": "", "done": True, "done_reason": "stop",
                 "context": [1, 2]}
        if stream:
            return Script(body=_lines(*parts, final))
        return Script(headers=JSON, body=_lines(dict(final, response="Hello")))
    if path == "/api/embed":
        inputs = body.get("input", [])
        n = 1 if isinstance(inputs, str) else len(inputs)
        return Script(headers=JSON, body=_lines({"model": model, "embeddings": [[0.6, 0.8]] * n}))
    if path == "/api/embeddings":
        return Script(headers=JSON, body=_lines({"embedding": [1.5, 2.5]}))
    if path == "/api/show":
        return Script(headers=JSON, body=_lines({
            "modelfile": "FROM x", "parameters": "", "template": "{{ .Prompt }}",
            "details": {"format": "gguf", "family": "llama"}, "model_info": {"general.architecture": "llama"},
            "capabilities": ["completion"], "modified_at": "2024-05-01T10:00:00Z",
        }))
    if path == "/v1/chat/completions":
        base = {"id": "chatcmpl-1", "created": 1714557600, "model": model, "system_fingerprint": "fp_ollama"}
        if stream:
            chunk = dict(base, object="chat.completion.chunk")
            return Script(headers=SSE, body=_sse(
                dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                                      "finish_reason": None}]),
                dict(chunk, choices=[{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]),
                dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            ))
        return Script(headers=(("content-type", "application/json"),), body=_lines(dict(
            base, object="chat.completion",
            choices=[{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
            usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        )))
    if path == "/v1/completions":
        return Script(headers=(("content-type", "application/json"),), body=_lines({
            "id": "cmpl-1", "object": "text_completion", "created": 1714557600, "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": "Hello", "index": 0, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }))
    if path == "/v1/embeddings":
        inputs = body.get("input", [])
        n = 1 if isinstance(inputs, str) else len(inputs)
        return Script(headers=(("content-type", "application/json"),), body=_lines({
            "object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": [0.6, 0.8], "index": i} for i in range(n)],
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }))
    if path == "/v1/responses":
        return Script(headers=(("content-type", "application/json"),), body=_lines({
            "id": "resp_1", "object": "response", "created_at": 1714557600, "status": "completed", "model": model,
            "output": [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        }))
    if path in ("/api/copy", "/api/delete"):
        return Script(headers=(), body=[])
    if path == "/api/pull":
        lines = _lines({"status": "pulling manifest"}, {"status": "success"})
        return Script(body=lines) if stream else Script(headers=JSON, body=lines[-1:])
    return Script(status=404, headers=(("content-type", "text/plain"),), body=[b"404 page not found"])


# --- the mesh -------------------------------------------------------------------

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


def model(name: str, digest: str = DIGEST_A, *, loaded: bool = False,
          modified_at: str = "2024-05-01T10:00:00Z", size: int = 1000, **details: Any) -> ModelInfo:
    return ModelInfo(name=name, digest=digest, size=size, loaded=loaded, modified_at=modified_at,
                     details=details or {"format": "gguf", "family": "llama"})


class FakeMesh:
    """A MeshView over a hand-made peer table; upstreams by peer id."""

    def __init__(self, self_id: str = "peer-self") -> None:
        self.self_id = self_id
        self._peers: dict[str, PeerView] = {}
        self.upstreams: dict[str, FakeUpstream] = {}
        self.extra_status: dict[str, Any] = {"listen_addrs": ["/ip4/127.0.0.1/tcp/4001"]}

    def add(self, peer_id: str, models: Sequence[ModelInfo], upstream: FakeUpstream | None = None, *,
            state: PeerState = PeerState.ALIVE, load: LoadInfo = LoadInfo(capacity=4),
            last_seen: float | None = None) -> FakeUpstream:
        upstream = upstream or FakeUpstream(peer_id, ollama_like)
        self._peers[peer_id] = PeerView(
            peer_id=peer_id, addrs=(f"/ip4/10.0.0.1/tcp/4001/p2p/{peer_id}",), api_url="", version="0.1.0",
            models=tuple(models), load=load, seq=1,
            last_seen=trio.current_time() if last_seen is None else last_seen,
            state=state, is_self=peer_id == self.self_id,
        )
        self.upstreams[peer_id] = upstream
        return upstream

    def snapshot(self) -> Snapshot:
        return Snapshot(peers=tuple(sorted(self._peers.values(), key=lambda p: p.peer_id)),
                        taken_at=trio.current_time())

    def upstream(self, peer_id: str) -> FakeUpstream:
        if peer_id not in self.upstreams:
            raise UpstreamUnavailable(f"unknown peer {peer_id}")
        return self.upstreams[peer_id]

    def status(self) -> dict[str, Any]:
        return dict(self.extra_status)


# --- a running gateway ----------------------------------------------------------


# A data dir without api_keys.json, so the developer's own ~/.meshollama keys never close a test gateway.
_NO_KEYS = tempfile.TemporaryDirectory(prefix="meshollama-gw-test-")


def make_config(*, data_dir: Any = None, **gateway: Any) -> Config:
    # round_robin: the first request tries peers in peer-id order, so tests know who is first.
    defaults: dict[str, Any] = {"listen": "127.0.0.1:0", "routing": "round_robin", "sideline_seconds": 30.0}
    defaults.update(gateway)
    node = replace(NodeConfig(), data_dir=Path(data_dir or _NO_KEYS.name))
    return Config(node=node, gateway=replace(GatewayConfig(), **defaults))


@dataclass
class Running:
    url: str
    app: Any
    registry: CollectorRegistry
    config: Config
    cancel_scope: trio.CancelScope = field(repr=False)

    @property
    def proxy(self) -> Any:
        return self.app.extensions["meshollama"].proxy

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@asynccontextmanager
async def running_gateway(mesh: FakeMesh, backend: Any = None, *, grace_period: float = 1.0,
                          **gateway: Any) -> AsyncIterator[Running]:
    """Hypercorn on 127.0.0.1:<port 0> serving a gateway over ``mesh``."""
    config = make_config(**gateway)
    registry = CollectorRegistry()
    app = create_app(config, mesh, backend, registry)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve_gateway, app, config.gateway.listen, grace_period=grace_period))
        try:
            yield Running(f"http://{bound}", app, registry, config, nursery.cancel_scope)
        finally:
            nursery.cancel_scope.cancel()
