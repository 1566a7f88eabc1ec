"""A stand-in Ollama server for tests: the API surface, real streaming, faults.

It answers the Ollama HTTP API (``shared/reference/ollama-api.md``) closely
enough for routing, fault and conformance tests: the same paths, methods,
status codes, content types, error texts and stream framing as Ollama, with
canned text instead of a model. Generated text names the server
(``"hello from NODE ..."``) so a test can tell which node answered, unless the
``text`` knob gives the words to generate instead: then every fake with the
same ``text`` says the same thing, and a request that already holds the first
k words (a chat whose last message is the assistant's partial answer, or a raw
prompt ending with it) gets words k.. onward, as Ollama continues a final
assistant message. That lets a test check that an answer resumed on another
node has no duplicate or missing word.
``/api/generate`` and ``/api/chat`` also make Ollama's request checks
(``keep_alive``, ``think``, base64 ``images``, ``raw``, ``top_logprobs``,
``tools`` on a model without that capability, ``format``) and answer
``format`` with JSON text that fits it.

It is a small HTTP/1.1 server on trio sockets with ``h11`` rather than an
ASGI app, because the faults it must inject live below ASGI: a stream that
stops after N chunks *without* the terminating chunk, a connection closed
mid-body, a stream that stalls with its connection open, a client disconnect
noticed while the handler sleeps (counted in ``state()["aborted"]``, and the
request logged with outcome ``aborted``). Every NDJSON line and SSE event is
its own HTTP chunk, written when produced.

In-process::

    async with trio.open_nursery() as nursery:
        fake = await nursery.start(partial(serve_fake, ["llama3:latest"], name="a"))
        fake.url, fake.requests, fake.set(token_delay=0.05), await fake.wait_for(pred)

As a subprocess (``run_fake_process`` wraps this)::

    python -m tests.fakes.fake_ollama --port 0 --models llama3:latest,nomic-embed-text:latest \
        --port-file F [--token-delay 0.01] [--tokens 8] [--name NODE] [--text "w01 w02 ..."] \
        [--no-host-check] [--models-dir DIR]

``models_dir`` (``--models-dir``) makes it also hold every model whose manifest
is in that Ollama models directory (``manifests/<host>/<ns>/<model>/<tag>``,
``blobs/``), rescanned on every request: listed with the manifest's sha256 as
digest and the sum of its blob sizes as size, served like the other models, and
``/api/delete`` removes its manifest file.

and steer it with ``POST /_fake/control`` (JSON of knobs, see :class:`Knobs`),
``GET /_fake/requests`` (the request log) and ``GET /_fake/state``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import http
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio

log = logging.getLogger("tests.fake_ollama")

VERSION = "0.32.15"
DEFAULT_MODELS = ("llama3:latest", "nomic-embed-text:latest")
REPO_ROOT = Path(__file__).resolve().parents[2]

NDJSON = "application/x-ndjson"
JSON = "application/json; charset=utf-8"
JSON_PLAIN = "application/json"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
THINK_LEVELS = ("low", "medium", "high", "max")

# Requests that run a model: the ones faults apply to unless told otherwise.
INFERENCE_PATHS = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)

# --- model names (deliberately independent of meshollama.names) -----------

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*\Z")


def canonical(name: object) -> str | None:
    """Ollama's ``DisplayShortest`` form of ``name``, or None if it is invalid."""
    if not isinstance(name, str) or not name:
        return None
    rest, tag = name, "latest"
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
    parts = rest.split("/")
    if len(parts) > 3 or not all(parts) or not tag:
        return None
    host, namespace = "registry.ollama.ai", "library"
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    if not (_HOST.match(host) and _PART.match(namespace) and "." not in namespace):
        return None
    if not (_PART.match(model) and _PART.match(tag)):
        return None
    if host.lower() != "registry.ollama.ai":
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != "library":
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def _key(name: object) -> str | None:
    c = canonical(name)
    return c.lower() if c else None


def full_name(short: str) -> str:
    """``llama3:latest`` -> ``registry.ollama.ai/library/llama3:latest``, as Ollama's capability errors name it."""
    slashes = short.count("/")
    if slashes == 0:
        return f"registry.ollama.ai/library/{short}"
    if slashes == 1:
        return f"registry.ollama.ai/{short}"
    return short


def schema_instance(schema: Any, text: str) -> Any:
    """A value satisfying a simple JSON schema: what structured output would produce."""
    if not isinstance(schema, dict):
        return text
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {k: schema_instance(v, text) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [schema_instance(schema.get("items") or {}, text)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, text)


# --- state -------------------------------------------------------------------


def _rfc3339(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000" + (t.strftime("%z")[:3] + ":" + t.strftime("%z")[3:])


def _now() -> str:
    """``created_at`` as Ollama writes it: UTC with nanoseconds and ``Z``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


@dataclass
class FakeModel:
    """One model in the fake's store."""

    name: str  # canonical short form
    modified: dt.datetime
    embedding: bool = False
    digest: str = ""
    disk_size: int = 0  # a model from ``models_dir``: the sum of its blob sizes

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.name.lower().encode()).hexdigest()

    @property
    def size(self) -> int:
        return self.disk_size or 100_000_000 + int(self.digest[:6], 16)

    @property
    def family(self) -> str:
        return "nomic-bert" if self.embedding else "llama"

    @property
    def namespace(self) -> str:
        parts = self.name.rpartition(":")[0].split("/")
        return parts[-2] if len(parts) > 1 else "library"

    def capabilities(self) -> list[str]:
        return ["embedding"] if self.embedding else ["completion"]

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": "137M" if self.embedding else "8.0B",
            "quantization_level": "F16" if self.embedding else "Q4_0",
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": _rfc3339(self.modified),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def make_model(name: str, modified: dt.datetime | None = None, digest: str = "") -> FakeModel:
    c = canonical(name)
    if c is None:
        raise ValueError(f"invalid model name {name!r}")
    embedding = any(s in c.lower() for s in ("embed", "minilm", "bge"))
    return FakeModel(c, modified or dt.datetime.now(dt.timezone.utc), embedding, digest)


@dataclass
class Knobs:
    """Behaviour switches, settable in-process (:meth:`FakeOllama.set`) or via ``POST /_fake/control``.

    * ``token_delay``: seconds before each streamed chunk (read per chunk, so it
      can change mid-stream);
    * ``tokens``: content chunks per generation (``options.num_predict`` /
      ``max_tokens`` lower it and make ``done_reason`` ``"length"``);
    * ``fail_before_first_byte``: ``{"status": 503, "body": {...} | "text"}``:
      answer that instead of running the request;
    * ``fail_after_n_chunks``: ``{"n": 2, "mode": "error" | "close", "error": "boom"}``:
      a streamed answer writes N chunks, then either an ``{"error": ...}`` line
      and a proper end (``error``), or drops the connection mid-body (``close``);
    * ``hang_before_first_byte``: requests wait, sending nothing, until it is
      switched off or the client leaves;
    * ``stall_after_n_chunks``: a streamed answer writes N chunks, then sends
      nothing more (the connection stays open) until the knob is set to None or
      the client leaves; then it carries on to a proper end. A wedged backend
      mid-stream. Non-streamed answers are not affected;
    * ``host_check``: answer 403 with an empty body unless ``Host`` is loopback,
      private, ``localhost`` or similar, as loopback-bound Ollama does;
    * ``fault_paths``: which paths the four faults apply to;
    * ``fault_count``: faults apply to the next N matching requests and are then
      cleared; None means until changed. A request already hanging or stalled
      stays so until its knob is switched off, or it leaves;
    * ``text``: generate these words (split before each run of whitespace:
      ``"a b c"`` -> ``"a", " b", " c"``) instead of ``"hello from NODE ..."``;
      ``tokens`` still caps how many words the whole answer has. A chat (native
      or ``/v1``) whose last message is ``{"role": "assistant", "content": C}``
      with C the first k words continues with word k (C not such a prefix: from
      word 0, recorded in the request log and ``state()``); a raw
      ``/api/generate`` prompt that ends with the first k words (longest k)
      continues likewise. ``num_predict`` / ``max_tokens`` limit the words of
      this request; ``eval_count`` counts them and ``prompt_eval_count`` is
      5 + k.
    """

    token_delay: float = 0.01
    tokens: int = 8
    fail_before_first_byte: dict[str, Any] | None = None
    fail_after_n_chunks: dict[str, Any] | None = None
    hang_before_first_byte: bool = False
    stall_after_n_chunks: int | None = None
    host_check: bool = True
    fault_paths: tuple[str, ...] = INFERENCE_PATHS
    fault_count: int | None = None
    text: str | None = None


@dataclass
class RecordedRequest:
    """One request as the fake received it (``/_fake/*`` requests are not logged)."""

    method: str
    path: str  # with the query string
    headers: tuple[tuple[str, str], ...]
    body: bytes
    outcome: str = "pending"  # ok | aborted (client left) | fault | forbidden | error
    continued: int | None = None  # with the text knob: words of the answer the request already held
    mismatched_prefix: str | None = None  # an assistant prefix that is not a prefix of the text

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": [list(h) for h in self.headers],
            "body": self.body.decode("utf-8", "replace"),
            "outcome": self.outcome,
            "continued": self.continued,
            "mismatched_prefix": self.mismatched_prefix,
        }


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Stopped(Exception):
    """The stream was ended early on purpose (``fail_after_n_chunks`` mode ``error``)."""


class _Dropped(Exception):
    """The connection is to be dropped on purpose (``fail_after_n_chunks`` mode ``close``)."""


@dataclass
class _Req:
    method: str
    path: str
    query: str
    body: bytes
    record: RecordedRequest
    param: str = ""  # the :digest or :model path segment

    @property
    def openai(self) -> bool:
        return self.path.startswith("/v1/")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _line(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def split_text(text: str) -> list[str]:
    """The ``text`` knob's tokens: one word each, with the whitespace before it."""
    return re.findall(r"\s*\S+", text)


def prefix_length(words: Sequence[str], content: str) -> int | None:
    """k such that ``content`` is the first k ``words`` joined, or None."""
    acc = ""
    for k, word in enumerate(words):
        if acc == content:
            return k
        if len(acc) >= len(content):
            return None
        acc += word
    return len(words) if acc == content else None


def _content_text(content: object) -> str | None:
    """A message's text: a string, or (``/v1``) the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return None


def _go_type(value: Any) -> str:
    """The JSON type name Go's encoding/json uses in its errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "null")


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def host_allowed(host: str | None) -> bool:
    """Ollama's ``allowedHostsMiddleware`` for a loopback listener."""
    if not host:
        return True
    h = host.strip().lower()
    if h.startswith("["):
        h = h[1 : h.find("]")]
    elif h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    if h in ("localhost", socket.gethostname().lower()) or h.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified


class _Writer:
    """Writes one HTTP response; streamed chunks go out one HTTP chunk each."""

    def __init__(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        method: str,
        fault: dict | None,
        stall: tuple[int, Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._method = method
        self._fault = fault
        self._stall = stall  # (after this many chunks, wait for this)
        self.started = False
        self.chunks = 0
        self.error_chunk = b""

    async def _send(self, event: Any) -> None:
        data = self._conn.send(event)
        if data:
            await self._stream.send_all(data)

    def _head(self, status: int, content_type: str | None, extra: Iterable[tuple[str, str]]) -> h11.Response:
        headers = [("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()))]
        if content_type:
            headers.append(("Content-Type", content_type))
        headers.extend(extra)
        self.started = True
        return h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase)

    async def respond(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
        await self._send(self._head(status, content_type, [("Content-Length", str(len(body)))]))
        if body and self._method != "HEAD":
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def json(self, status: int, obj: Any, content_type: str = JSON) -> None:
        await self.respond(status, _dumps(obj), content_type)

    async def start(self, content_type: str, status: int = 200) -> None:
        await self._send(self._head(status, content_type, ()))

    async def chunk(self, data: bytes) -> None:
        if self._stall is not None and self.chunks >= self._stall[0]:
            _, wait = self._stall
            self._stall = None
            await wait()
        fault = self._fault
        if fault is not None and self.chunks >= int(fault.get("n", 0)):
            if fault.get("mode", "error") == "close":
                raise _Dropped()
            if self.error_chunk:
                await self._send(h11.Data(data=self.error_chunk))
            await self._send(h11.EndOfMessage())
            raise _Stopped()
        await self._send(h11.Data(data=data))
        self.chunks += 1

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())


# --- the server --------------------------------------------------------------


class FakeOllama:
    """The fake's state and handlers; :meth:`serve` puts it on a port."""

    def __init__(
        self,
        models: Iterable[str] = DEFAULT_MODELS,
        *,
        name: str = "fake",
        token_delay: float = 0.01,
        tokens: int = 8,
        host_check: bool = True,
        text: str | None = None,
        models_dir: str | Path | None = None,
    ) -> None:
        self.name = name
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._dir_keys: set[str] = set()  # keys of self.models that came from models_dir
        self.knobs = Knobs(token_delay=token_delay, tokens=tokens, host_check=host_check, text=text)
        base = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
        self.models: dict[str, FakeModel] = {}
        for i, m in enumerate(models):
            model = make_model(m, base - dt.timedelta(minutes=i))
            self.models[model.name.lower()] = model
        self.loaded: dict[str, dt.datetime] = {}  # key -> expires_at
        self.blobs: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self.active = 0  # handlers running now
        self.aborted = 0  # handlers cut short because the client left
        self.completed = 0
        self.mismatched_prefixes = 0  # assistant prefixes that did not match the text knob
        self.port = 0
        self.url = ""
        self._ids = itertools.count()
        self._event = trio.Event()
        self._hang_epoch = 0
        self._stall_epoch = 0

    # -- knobs and waiting --

    def set(self, **knobs: Any) -> None:
        """Change knobs (see :class:`Knobs`); raises ValueError on unknown names."""
        fields = {f.name for f in dataclasses.fields(Knobs)}
        for k, v in knobs.items():
            if k not in fields:
                raise ValueError(f"unknown knob {k!r}")
            if k == "fault_paths":
                v = tuple(v)
            if k == "hang_before_first_byte" and not v:
                self._hang_epoch += 1  # releases requests hanging now
            if k == "stall_after_n_chunks" and v is None:
                self._stall_epoch += 1  # releases requests stalled now
            setattr(self.knobs, k, v)
        self._notify()

    def clear_faults(self) -> None:
        self.set(
            fail_before_first_byte=None,
            fail_after_n_chunks=None,
            hang_before_first_byte=False,
            stall_after_n_chunks=None,
            fault_count=None,
        )

    def add_model(self, name: str) -> FakeModel:
        model = make_model(name)
        self.models[model.name.lower()] = model
        self._notify()
        return model

    def remove_model(self, name: str) -> None:
        key = _key(name)
        self.models.pop(key or "", None)
        self.loaded.pop(key or "", None)
        self._notify()

    def sync_models_dir(self) -> None:
        """Make ``self.models`` hold exactly the models of ``models_dir`` (besides the others)."""
        if self.models_dir is None:
            return
        # imported only here, so the fake's names stay independent of meshollama's otherwise
        from meshollama.models.ollama_dir import OllamaDir

        store = OllamaDir(self.models_dir)
        found: dict[str, FakeModel] = {}
        for name, manifest in store.models():
            path = store.find_manifest(name)
            try:
                mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc) if path else None
                model = make_model(name, mtime, manifest.digest.removeprefix("sha256:"))
            except (OSError, ValueError):
                continue
            if mtime is None:
                continue
            model.disk_size = manifest.total_size()
            found[model.name.lower()] = model
        changed = False
        for key in self._dir_keys - found.keys():
            self.models.pop(key, None)
            self.loaded.pop(key, None)
            changed = True
        for key, model in found.items():
            old = self.models.get(key)
            if old is None or (old.name, old.digest, old.size, old.modified) != (
                    model.name, model.digest, model.size, model.modified):
                self.models[key] = model
                changed = True
        self._dir_keys = set(found)
        if changed:
            self._notify()

    def _notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked on every state change."""
        while not predicate():
            await self._event.wait()

    def state(self) -> dict[str, Any]:
        self.sync_models_dir()
        return {
            "name": self.name,
            "active": self.active,
            "aborted": self.aborted,
            "completed": self.completed,
            "mismatched_prefixes": self.mismatched_prefixes,
            "requests": len(self.requests),
            "models": [m.name for m in self.models.values()],
            "loaded": sorted(self.loaded),
            "knobs": dataclasses.asdict(self.knobs),
        }

    def paths(self) -> list[str]:
        """Paths of logged requests, in order (handy in assertions)."""
        return [r.path for r in self.requests]

    # -- serving --

    async def serve(self, port: int = 0, host: str = "127.0.0.1", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await self._read_request(stream, conn)
                if req is None:
                    return
                if not await self._dispatch(stream, conn, req):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, _Dropped):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection) -> _Req | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers.raw_items())
                record = RecordedRequest(head.method.decode(), target, headers, bytes(body))
                return _Req(record.method, path, query, bytes(body), record)
            else:  # ConnectionClosed, PAUSED
                return None

    async def _dispatch(self, stream: trio.SocketStream, conn: h11.Connection, req: _Req) -> bool:
        """Answer one request; returns whether the connection may be reused."""
        writer = _Writer(stream, conn, req.method, None)
        self.sync_models_dir()
        if req.path.startswith("/_fake/"):
            await self._control(req, writer)
            return True
        self.requests.append(req.record)
        self._notify()
        if self.knobs.host_check and not host_allowed(req.record.header("host")):
            req.record.outcome = "forbidden"
            await writer.respond(403)
            return True
        handler = self._route(req)
        fault = self._take_fault(req) if handler is not None else None
        if fault is not None:
            writer = _Writer(stream, conn, req.method, fault.get("fail_after_n_chunks"), self._stall(fault))
        left = eof = dropped = False
        self.active += 1
        self._notify()
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as handler_scope:

                    async def watch() -> None:
                        # HTTP/1.1 clients send nothing while a response is in
                        # flight, so EOF here means the client went away.
                        nonlocal left, eof
                        try:
                            while data := await stream.receive_some(65536):
                                conn.receive_data(data)  # pipelined: kept for the next cycle
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                        eof = True
                        if conn.our_state is not h11.DONE:  # else it left after reading it all
                            left = True
                            handler_scope.cancel()

                    nursery.start_soon(watch)
                    try:
                        await self._run(req, writer, handler, fault)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        left = True
                    except _Dropped:
                        dropped = True
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1
            if left:
                req.record.outcome = "aborted"
                self.aborted += 1
            else:
                self.completed += 1
            self._notify()
        if dropped:
            req.record.outcome = "fault"
            raise _Dropped()
        return not (left or eof)

    async def _run(self, req: _Req, w: _Writer, handler: Any, fault: dict | None) -> None:
        if handler is None:
            status = 405 if self._path_known(req.path) else 404
            body = b"405 method not allowed" if status == 405 else b"404 page not found"
            req.record.outcome = "ok"
            await w.respond(status, body, "text/plain")
            return
        if fault is not None:
            if fault.get("hang_before_first_byte"):
                epoch = self._hang_epoch
                await self.wait_for(lambda: self._hang_epoch != epoch)
            early = fault.get("fail_before_first_byte")
            if early is not None:
                req.record.outcome = "fault"
                body = early.get("body", {"error": "injected failure"})
                raw = body.encode() if isinstance(body, str) else _dumps(body)
                ctype = "text/plain; charset=utf-8" if isinstance(body, str) else JSON_PLAIN
                await w.respond(int(early.get("status", 500)), raw, ctype)
                return
        try:
            await handler(req, w)
            req.record.outcome = "ok"
        except _Stopped:
            req.record.outcome = "fault"
        except _HTTPError as e:
            req.record.outcome = "ok"
            obj = _openai_error(e.status, e.message) if req.openai else {"error": e.message}
            await w.json(e.status, obj, JSON_PLAIN if req.openai else JSON)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled, _Dropped):
            raise
        except Exception as e:  # a bug in the fake: make it visible
            log.exception("fake handler failed")
            req.record.outcome = "error"
            if not w.started:
                await w.json(500, {"error": f"fake bug: {e!r}"})

    def _stall(self, fault: dict) -> tuple[int, Callable[[], Awaitable[None]]] | None:
        n = fault.get("stall_after_n_chunks")
        if n is None:
            return None
        epoch = self._stall_epoch  # taken now: a knob cleared before chunk N means no stall

        async def wait() -> None:
            await self.wait_for(lambda: self._stall_epoch != epoch)

        return int(n), wait

    def _take_fault(self, req: _Req) -> dict | None:
        k = self.knobs
        stall = k.stall_after_n_chunks is not None
        if not (k.fail_before_first_byte or k.fail_after_n_chunks or k.hang_before_first_byte or stall):
            return None
        if not any(req.path == p or req.path.startswith(p.rstrip("/") + "/") for p in k.fault_paths):
            return None
        fault = {
            "fail_before_first_byte": k.fail_before_first_byte,
            "fail_after_n_chunks": k.fail_after_n_chunks,
            "hang_before_first_byte": k.hang_before_first_byte,
            "stall_after_n_chunks": k.stall_after_n_chunks,
        }
        if k.fault_count is not None:
            k.fault_count -= 1
            if k.fault_count <= 0:
                # Used up: later requests run normally; a request hanging (or
                # stalled) now stays so until its knob is set off or it leaves.
                k.fail_before_first_byte = k.fail_after_n_chunks = k.fault_count = None
                k.stall_after_n_chunks = None
                k.hang_before_first_byte = False
                self._notify()
        return fault

    # -- routing --

    _ROUTES: dict[str, dict[str, str]] = {
        "/": {"GET": "_root", "HEAD": "_root"},
        "/api/version": {"GET": "_version", "HEAD": "_version"},
        "/api/tags": {"GET": "_tags", "HEAD": "_tags"},
        "/api/ps": {"GET": "_ps"},
        "/api/show": {"POST": "_show"},
        "/api/generate": {"POST": "_generate"},
        "/api/chat": {"POST": "_chat"},
        "/api/embed": {"POST": "_embed"},
        "/api/embeddings": {"POST": "_embeddings"},
        "/api/pull": {"POST": "_pull"},
        "/api/push": {"POST": "_push"},
        "/api/create": {"POST": "_create"},
        "/api/copy": {"POST": "_copy"},
        "/api/delete": {"DELETE": "_delete"},
        "/api/blobs/:digest": {"POST": "_blob", "HEAD": "_blob"},
        "/v1/chat/completions": {"POST": "_v1_chat"},
        "/v1/completions": {"POST": "_v1_completions"},
        "/v1/embeddings": {"POST": "_v1_embeddings"},
        "/v1/models": {"GET": "_v1_models"},
        "/v1/models/:model": {"GET": "_v1_model"},
    }

    def _pattern(self, path: str) -> tuple[str, str]:
        for prefix, pattern in (("/api/blobs/", "/api/blobs/:digest"), ("/v1/models/", "/v1/models/:model")):
            if path.startswith(prefix) and path != prefix and "/" not in path[len(prefix) :]:
                return pattern, path[len(prefix) :]
        return path, ""

    def _path_known(self, path: str) -> bool:
        return self._pattern(path)[0] in self._ROUTES

    def _route(self, req: _Req) -> Any:
        pattern, req.param = self._pattern(req.path)
        name = self._ROUTES.get(pattern, {}).get(req.method)
        return getattr(self, name) if name else None

    # -- helpers --

    def _json(self, req: _Req) -> dict[str, Any]:
        if not req.body:
            raise _HTTPError(400, "missing request body")
        text = req.body.decode("utf-8", "replace")
        try:
            obj, _ = json.JSONDecoder().raw_decode(text.lstrip())
        except json.JSONDecodeError as e:
            raise _HTTPError(400, "unexpected EOF" if e.pos >= len(text.strip()) else f"invalid character: {e.msg}")
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            raise _HTTPError(400, f"json: cannot unmarshal {_go_type(obj)} into Go value of type api.Request")
        return obj

    @staticmethod
    def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
        value = body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _HTTPError(400, f"json: cannot unmarshal {_go_type(value)} into Go struct field .{key} of type bool")
        return value

    def _find(self, name: object) -> FakeModel | None:
        key = _key(name)
        return self.models.get(key) if key else None

    def _words(self) -> list[str]:
        """The whole answer's tokens: ``text``'s words, or ``hello from NAME token3 ...``; ``tokens`` of them."""
        n = max(0, int(self.knobs.tokens))
        if self.knobs.text is not None:
            return split_text(self.knobs.text)[:n]
        return (["hello", " from", f" {self.name}"] + [f" token{i}" for i in range(3, n)])[:n]

    def _tokens(self, limit: object, start: int = 0) -> tuple[list[str], str]:
        words = self._words()[start:]
        if isinstance(limit, int) and 0 <= limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    async def _delay(self) -> None:
        await trio.sleep(max(0.0, float(self.knobs.token_delay)))

    def _metrics(self, count: int, prefill: int = 0) -> dict[str, int]:
        gen = int(count * self.knobs.token_delay * 1e9) + 1000
        return {
            "total_duration": gen + 2_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": 5 + prefill,
            "prompt_eval_duration": 500_000,
            # With text, exact, so a resumed answer's counts add up.
            "eval_count": count if self.knobs.text is not None else max(count, 1),
            "eval_duration": gen,
        }

    def _mark_loaded(self, model: FakeModel, keep_alive: object = None) -> None:
        key = model.name.lower()
        seconds = self._keep_alive_seconds(keep_alive)
        if seconds == 0:
            self.loaded.pop(key, None)
        else:
            now = dt.datetime.now(dt.timezone.utc)
            if seconds is None:
                self.loaded[key] = now + dt.timedelta(minutes=5)
            elif seconds < 0:  # Ollama: forever, i.e. MaxInt64 nanoseconds (around the year 2318)
                self.loaded[key] = now + dt.timedelta(microseconds=(2**63 - 1) // 1000)
            else:
                self.loaded[key] = now + dt.timedelta(seconds=seconds)
        self._notify()

    # -- request checks Ollama makes (bind time first, then per model) --

    _DURATION = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+\Z")
    _DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
    _UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

    @classmethod
    def _keep_alive_seconds(cls, value: object) -> float | None:
        """``keep_alive`` in seconds (None when absent; negative: forever), or a 400 as Ollama's bind gives.

        A number is seconds, a string a Go duration (``"10m"``, ``"0"``, ``"-1s"``).
        """
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            kind = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}.get(type(value), "?")
            raise _HTTPError(400, f"Unsupported type: '{kind}'")
        if not isinstance(value, str):
            return float(value)
        text = value.strip()
        if text in ("0", "+0", "-0"):
            return 0.0
        if not cls._DURATION.match(text):
            raise _HTTPError(400, f'time: invalid duration "{value}"')
        total = sum(float(n) * cls._UNIT_SECONDS[u] for n, u in cls._DURATION_PART.findall(text))
        return -total if text.startswith("-") else total

    def _bind_checks(self, body: dict[str, Any], images: object) -> None:
        """What Go's ``ShouldBindJSON`` rejects with 400 before the model is looked up."""
        self._keep_alive_seconds(body.get("keep_alive"))
        think = body.get("think")
        if not (think is None or isinstance(think, bool) or think in THINK_LEVELS):
            allowed = '"high", "medium", "low", "max", true, or false'
            raise _HTTPError(400, f"invalid think value: {_dumps(think).decode()} (must be {allowed})")
        if images is None:
            return
        if not isinstance(images, list):
            raise _HTTPError(400, f"json: cannot unmarshal {_go_type(images)} into Go value of type []api.ImageData")
        for image in images:
            if not isinstance(image, str):
                raise _HTTPError(400, f"json: cannot unmarshal {_go_type(image)} into Go value of type []uint8")
            try:
                base64.b64decode(image, validate=True)
            except ValueError:
                raise _HTTPError(400, "illegal base64 data at input byte 0") from None

    @staticmethod
    def _check_top_logprobs(body: dict[str, Any]) -> None:
        n = body.get("top_logprobs")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 20):
            raise _HTTPError(400, "top_logprobs must be between 0 and 20")

    def _continue_chat(self, req: _Req, messages: list[Any]) -> int:
        """With ``text``: how many of its words a chat ending in an assistant message already holds."""
        last = messages[-1] if messages else None
        if self.knobs.text is None or not isinstance(last, dict) or last.get("role") != "assistant":
            return 0
        content = _content_text(last.get("content")) or ""
        k = prefix_length(split_text(self.knobs.text), content)
        if k is None:
            req.record.mismatched_prefix = content
            self.mismatched_prefixes += 1
            self._notify()
            k = 0
        req.record.continued = k
        return k

    def _continue_raw(self, req: _Req, prompt: str) -> int:
        """With ``text``: the most of its first words a raw prompt ends with."""
        if self.knobs.text is None:
            return 0
        acc, best = "", 0
        for k, word in enumerate(split_text(self.knobs.text), 1):
            acc += word
            if len(acc) > len(prompt):
                break
            if prompt.endswith(acc):
                best = k
        if best:
            req.record.continued = best
        return best

    def _output(self, body: dict[str, Any], limit: object, start: int = 0) -> tuple[list[str], str]:
        """The tokens to send: canned words from ``start``, or JSON text when ``format`` asks for structured output."""
        fmt = body.get("format")
        if fmt is None or fmt == "":
            return self._tokens(limit, start)
        if fmt == "json":
            value: Any = {"response": f"hello from {self.name}"}
        elif isinstance(fmt, dict):
            value = schema_instance(fmt, f"hello from {self.name}")
        else:  # Ollama finds this only once the model is loaded: a 500
            expected = 'expected "json" or a valid JSON Schema object'
            raise _HTTPError(500, f"invalid format: {_dumps(fmt).decode()}; {expected}")
        text = _dumps(value).decode()
        words = [text[i : i + 4] for i in range(0, len(text), 4)]
        if isinstance(limit, int) and 0 <= limit < len(words):
            return words[:limit], "length"
        return words, "stop"

    def _next_id(self) -> int:
        return next(self._ids) % 999

    @staticmethod
    def _vector(text: str, dims: int, normalise: bool = True) -> list[float]:
        raw = b"".join(hashlib.sha256(f"{text}/{i}".encode()).digest() for i in range(dims // 32 + 1))
        vec = [(b - 127.5) / 127.5 for b in raw[:dims]]
        norm = math.sqrt(sum(x * x for x in vec)) or 1.0
        return [x / norm for x in vec] if normalise else [x * 3.0 for x in vec]

    # -- native endpoints --

    async def _root(self, req: _Req, w: _Writer) -> None:
        await w.respond(200, b"Ollama is running", TEXT)

    async def _version(self, req: _Req, w: _Writer) -> None:
        await w.json(200, {"version": VERSION})

    async def _tags(self, req: _Req, w: _Writer) -> None:
        models = sorted(self.models.values(), key=lambda m: m.modified, reverse=True)
        await w.json(200, {"models": [m.tag_entry() for m in models]})

    async def _ps(self, req: _Req, w: _Writer) -> None:
        entries = []
        for key, expires in sorted(self.loaded.items(), key=lambda kv: kv[1], reverse=True):
            m = self.models.get(key)
            if m is None:
                continue
            entries.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "size": m.size,
                    "digest": m.digest,
                    "details": m.details(),
                    "expires_at": _rfc3339(expires),
                    "size_vram": m.size,
                    "context_length": 4096,
                }
            )
        await w.json(200, {"models": entries})

    async def _show(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _HTTPError(400, "model is required")
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{canonical(name) or name}' not found")
        await w.json(
            200,
            {
                "license": "",
                "modelfile": f"# Modelfile generated by fake ollama\nFROM {m.name}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": m.details(),
                "model_info": {
                    "general.architecture": m.family,
                    "general.parameter_count": m.size,
                    f"{m.family}.context_length": 8192,
                    f"{m.family}.embedding_length": 768 if m.embedding else 4096,
                },
                "capabilities": m.capabilities(),
                "modified_at": _rfc3339(m.modified),
            },
        )

    def _requested_model(
        self, body: dict[str, Any], *, missing: tuple[int, str], not_found: str = "model '{name}' not found"
    ) -> tuple[str, FakeModel]:
        """The request's model as Ollama checks it: absent (``missing``), malformed (400), unknown (404)."""
        name = body.get("model") or ""
        if not name:
            raise _HTTPError(*missing)
        if canonical(name) is None:
            raise _HTTPError(400, "invalid model name")
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, not_found.format(name=name))
        return name, m

    def _load_only(self, m: FakeModel, body: dict[str, Any]) -> str:
        """An empty prompt or message list only loads (or, with keep_alive 0, unloads) the model."""
        self._mark_loaded(m, body.get("keep_alive"))
        return "unload" if self._keep_alive_seconds(body.get("keep_alive")) == 0 else "load"

    async def _generate(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        stream = self._flag(body, "stream", True)
        self._bind_checks(body, body.get("images"))
        name, m = self._requested_model(body, missing=(404, "model '' not found"))
        prompt = body.get("prompt") or ""
        if not prompt:
            reason = self._load_only(m, body)
            obj = {"model": name, "created_at": _now(), "response": "", "done": True, "done_reason": reason}
            await w.json(200, obj)
            return
        if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
            raise _HTTPError(400, "raw mode does not support template, system, or context")
        self._check_top_logprobs(body)
        if m.embedding:
            raise _HTTPError(400, f'"{name}" does not support generate')
        if body.get("think") not in (None, False):
            raise _HTTPError(400, f'"{name}" does not support thinking')
        self._mark_loaded(m, body.get("keep_alive"))
        start = self._continue_raw(req, prompt) if body.get("raw") else 0
        tokens, reason = self._output(body, (body.get("options") or {}).get("num_predict"), start)
        final = {
            "model": name,
            "created_at": "",
            "response": "",
            "done": True,
            "done_reason": reason,
            **self._metrics(len(tokens), start),
        }
        if not body.get("raw"):
            final["context"] = list(range(1, len(tokens) + 6))
        if not stream:
            for _ in tokens:
                await self._delay()
            await w.json(200, {**final, "created_at": _now(), "response": "".join(tokens)})
            return
        w.error_chunk = _line({"error": self._fault_error()})
        await w.start(NDJSON)
        for tok in tokens:
            await self._delay()
            await w.chunk(_line({"model": name, "created_at": _now(), "response": tok, "done": False}))
        await w.chunk(_line({**final, "created_at": _now()}))
        await w.end()

    def _fault_error(self) -> str:
        fault = self.knobs.fail_after_n_chunks or {}
        return str(fault.get("error", "boom"))

    async def _chat(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        stream = self._flag(body, "stream", True)
        messages = body.get("messages")
        images = [i for msg in messages if isinstance(msg, dict)
                  for i in (msg.get("images") or [])] if isinstance(messages, list) else []
        self._bind_checks(body, images)
        name, m = self._requested_model(body, missing=(400, "model is required"))
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise _HTTPError(400, "json: cannot unmarshal into Go struct field ChatRequest.messages")
        if not messages:
            reason = self._load_only(m, body)
            await w.json(
                200,
                {
                    "model": name,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": reason,
                },
            )
            return
        self._check_top_logprobs(body)
        if m.embedding:
            raise _HTTPError(400, f'"{name}" does not support chat')
        if body.get("tools") and "tools" not in m.capabilities():
            raise _HTTPError(400, f"{full_name(m.name)} does not support tools")
        if body.get("think") not in (None, False):
            raise _HTTPError(400, f'"{name}" does not support thinking')
        self._mark_loaded(m, body.get("keep_alive"))
        start = self._continue_chat(req, messages)
        tokens, reason = self._output(body, (body.get("options") or {}).get("num_predict"), start)
        final = {
            "model": name,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": reason,
            **self._metrics(len(tokens), start),
        }
        if not stream:
            for _ in tokens:
                await self._delay()
            msg = {"role": "assistant", "content": "".join(tokens)}
            await w.json(200, {**final, "created_at": _now(), "message": msg})
            return
        w.error_chunk = _line({"error": self._fault_error()})
        await w.start(NDJSON)
        for tok in tokens:
            await self._delay()
            msg = {"role": "assistant", "content": tok}
            await w.chunk(_line({"model": name, "created_at": _now(), "message": msg, "done": False}))
        await w.chunk(_line({**final, "created_at": _now()}))
        await w.end()

    async def _embed(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        name, m = self._requested_model(body, missing=(404, "model '' not found"),
                                        not_found='model "{name}" not found, try pulling it first')
        inputs = body.get("input")
        if inputs is None or inputs == "":
            inputs = []
        elif isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise _HTTPError(400, "invalid input type")
        dims = body.get("dimensions") or 8
        self._mark_loaded(m, body.get("keep_alive"))
        await self._delay()
        vectors = [self._vector(x, int(dims)) for x in inputs]
        await w.json(
            200,
            {
                "model": name,
                "embeddings": vectors,
                "total_duration": 2_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": sum(len(x.split()) for x in inputs),
            },
        )

    async def _embeddings(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        name = body.get("model") or ""
        if not name:
            raise _HTTPError(400, "model is required")
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f'model "{name}" not found, try pulling it first')
        prompt = body.get("prompt") or ""
        self._mark_loaded(m, body.get("keep_alive"))
        await self._delay()
        await w.json(200, {"embedding": self._vector(prompt, 8, normalise=False) if prompt else []})

    async def _progress(
        self, w: _Writer, stream: bool, lines: Sequence[dict[str, Any]], on_write: Callable[[], None]
    ) -> None:
        """Stream status lines (or answer the last one); ``on_write`` runs before ``writing manifest``."""
        if stream:
            w.error_chunk = _line({"error": self._fault_error()})
            await w.start(NDJSON)
        for obj in lines:
            await self._delay()
            if obj.get("status") == "writing manifest":
                on_write()
            if stream:
                await w.chunk(_line(obj))
        if stream:
            await w.end()
        else:
            last = lines[-1]
            status = 500 if "error" in last else 200
            await w.json(status, last, JSON_PLAIN)

    async def _pull(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        name = body.get("model") or body.get("name") or ""
        c = canonical(name)
        if c is None:
            raise _HTTPError(400, "invalid model name")
        stream = self._flag(body, "stream", True)
        if "no-such" in c:
            lines: list[dict[str, Any]] = [
                {"status": "pulling manifest"},
                {"error": "pull model manifest: file does not exist"},
            ]
            await self._progress(w, stream, lines, lambda: None)
            return
        model = make_model(c)
        digest = f"sha256:{model.digest}"
        total = model.size
        lines = [
            {"status": "pulling manifest"},
            {"status": f"pulling {model.digest[:12]}", "digest": digest, "total": total},
            {"status": f"pulling {model.digest[:12]}", "digest": digest, "total": total, "completed": total // 2},
            {"status": f"pulling {model.digest[:12]}", "digest": digest, "total": total, "completed": total},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        await self._progress(w, stream, lines, lambda: self._store(model))

    def _store(self, model: FakeModel) -> None:
        self.models[model.name.lower()] = model
        self._notify()

    async def _push(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _HTTPError(400, "model is required")
        lines = [{"status": s} for s in ("retrieving manifest", "starting upload", "pushing manifest", "success")]
        await self._progress(w, self._flag(body, "stream", True), lines, lambda: None)

    async def _create(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        c = canonical(body.get("model") or body.get("name") or "")
        if c is None:
            raise _HTTPError(400, "invalid model name")
        source = body.get("from")
        if not source and not body.get("files"):
            raise _HTTPError(400, "neither 'from' or 'files' was specified")
        base = self._find(source) if source else None
        if source and base is None:
            raise _HTTPError(404, f"model '{source}' not found")
        model = make_model(c)
        if base is not None:
            model.embedding = base.embedding
        lines = [
            {"status": f"using existing layer sha256:{(base or model).digest}"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        await self._progress(w, self._flag(body, "stream", True), lines, lambda: self._store(model))

    async def _copy(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        source, dest = body.get("source") or "", body.get("destination") or ""
        if canonical(source) is None:
            raise _HTTPError(400, f'source "{source}" is invalid')
        if canonical(dest) is None:
            raise _HTTPError(400, f'destination "{dest}" is invalid')
        m = self._find(source)
        if m is None:
            raise _HTTPError(404, f'model "{source}" not found')
        self._store(make_model(dest, digest=m.digest))
        await w.respond(200)

    async def _delete(self, req: _Req, w: _Writer) -> None:
        body = self._json(req)
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _HTTPError(400, "model is required")
        if self._find(name) is None:
            raise _HTTPError(404, f"model '{name}' not found")
        if self.models_dir is not None and _key(name) in self._dir_keys:
            from meshollama.models.ollama_dir import OllamaDir

            path = OllamaDir(self.models_dir).find_manifest(name)
            if path is not None:
                path.unlink(missing_ok=True)
            self._dir_keys.discard(_key(name) or "")
        self.remove_model(name)
        await w.respond(200)

    async def _blob(self, req: _Req, w: _Writer) -> None:
        if not re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", req.param):
            raise _HTTPError(400, "invalid digest format")
        want = req.param[7:].lower()
        if req.method == "HEAD":
            await w.respond(200 if want in self.blobs else 404)
            return
        if want in self.blobs:
            await w.respond(200)
            return
        got = hashlib.sha256(req.body).hexdigest()
        if got != want:
            raise _HTTPError(400, f'digest mismatch, expected "sha256:{want}", got "sha256:{got}"')
        self.blobs.add(want)
        await w.respond(201)

    # -- OpenAI-compatible endpoints --

    def _v1_body(self, req: _Req) -> dict[str, Any]:
        try:
            return self._json(req)
        except _HTTPError as e:
            raise _HTTPError(400, e.message) from None

    def _v1_model_for(self, body: dict[str, Any]) -> tuple[str, FakeModel]:
        name = body.get("model") or ""
        m = self._find(name)
        if m is None:
            raise _HTTPError(404, f"model '{name}' not found")
        return name, m

    def _usage(self, count: int, prefill: int = 0) -> dict[str, int]:
        prompt = 5 + prefill
        return {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}

    async def _v1_chat(self, req: _Req, w: _Writer) -> None:
        body = self._v1_body(req)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "[] is too short - 'messages'")
        name, m = self._v1_model_for(body)
        if m.embedding:
            raise _HTTPError(400, f'"{name}" does not support chat')
        self._mark_loaded(m)
        start = self._continue_chat(req, messages)
        tokens, reason = self._tokens(body.get("max_tokens"), start)
        head = {
            "id": f"chatcmpl-{self._next_id()}",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": "fp_ollama",
        }
        if not body.get("stream"):
            for _ in tokens:
                await self._delay()
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": reason}
            obj = {**head, "object": "chat.completion", "choices": [choice], "usage": self._usage(len(tokens), start)}
            await w.json(200, obj, JSON_PLAIN)
            return
        chunk = {**head, "object": "chat.completion.chunk"}
        # Mid-stream errors reach /v1 clients as one empty chunk, then nothing.
        empty = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        w.error_chunk = _sse({**chunk, "choices": [empty]})
        await w.start(SSE)
        for i, tok in enumerate(tokens):
            await self._delay()
            delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
            await w.chunk(_sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        await w.chunk(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await w.chunk(_sse({**chunk, "choices": [], "usage": self._usage(len(tokens), start)}))
        await w.chunk(b"data: [DONE]\n\n")
        await w.end()

    async def _v1_completions(self, req: _Req, w: _Writer) -> None:
        body = self._v1_body(req)
        if not isinstance(body.get("prompt", ""), str):
            raise _HTTPError(400, "invalid type for 'prompt': expected a string")
        name, m = self._v1_model_for(body)
        self._mark_loaded(m)
        tokens, reason = self._tokens(body.get("max_tokens"))
        head = {
            "id": f"cmpl-{self._next_id()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": "fp_ollama",
        }
        if not body.get("stream"):
            for _ in tokens:
                await self._delay()
            choice = {"text": "".join(tokens), "index": 0, "finish_reason": reason}
            await w.json(200, {**head, "choices": [choice], "usage": self._usage(len(tokens))}, JSON_PLAIN)
            return
        usage = (body.get("stream_options") or {}).get("include_usage")
        zero = {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}} if usage else {}
        w.error_chunk = _sse({**head, "choices": [{"text": "", "index": 0, "finish_reason": None}], **zero})
        await w.start(SSE)
        for i, tok in enumerate(tokens):
            await self._delay()
            last = i == len(tokens) - 1
            choice = {"text": tok, "index": 0, "finish_reason": reason if last else None}
            await w.chunk(_sse({**head, "choices": [choice], **zero}))
        if not tokens:
            await w.chunk(_sse({**head, "choices": [{"text": "", "index": 0, "finish_reason": reason}], **zero}))
        if usage:
            await w.chunk(_sse({**head, "choices": [], "usage": self._usage(len(tokens))}))
        await w.chunk(b"data: [DONE]\n\n")
        await w.end()

    async def _v1_embeddings(self, req: _Req, w: _Writer) -> None:
        body = self._v1_body(req)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise _HTTPError(400, "invalid input")
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise _HTTPError(400, "invalid input type")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            message = f"Invalid value for 'encoding_format' = {fmt}. Supported values: ['float', 'base64']."
            raise _HTTPError(400, message)
        name, m = self._v1_model_for(body)
        self._mark_loaded(m)
        await self._delay()
        data = []
        for i, text in enumerate(inputs):
            vec: Any = self._vector(text, int(body.get("dimensions") or 8))
            if fmt == "base64":
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": vec, "index": i})
        tokens = sum(len(x.split()) for x in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        obj = {"object": "list", "data": data, "model": name, "usage": usage}
        await w.json(200, obj, JSON_PLAIN)

    def _v1_entry(self, m: FakeModel, id_: str) -> dict[str, Any]:
        return {"id": id_, "object": "model", "created": int(m.modified.timestamp()), "owned_by": m.namespace}

    async def _v1_models(self, req: _Req, w: _Writer) -> None:
        models = sorted(self.models.values(), key=lambda m: m.modified, reverse=True)
        data = [self._v1_entry(m, m.name) for m in models] or None  # Ollama sends null when empty
        await w.json(200, {"object": "list", "data": data}, JSON_PLAIN)

    async def _v1_model(self, req: _Req, w: _Writer) -> None:
        m = self._find(req.param)
        if m is None:
            raise _HTTPError(404, f"model '{canonical(req.param) or req.param}' not found")
        await w.json(200, self._v1_entry(m, req.param), JSON_PLAIN)

    # -- control --

    async def _control(self, req: _Req, w: _Writer) -> None:
        if req.path == "/_fake/requests" and req.method == "GET":
            await w.json(200, [r.to_dict() for r in self.requests], JSON_PLAIN)
        elif req.path == "/_fake/state" and req.method == "GET":
            await w.json(200, self.state(), JSON_PLAIN)
        elif req.path == "/_fake/control" and req.method == "POST":
            try:
                body = json.loads(req.body or b"{}")
                self.control(body)
            except (ValueError, TypeError, AttributeError) as e:
                await w.json(400, {"error": str(e)}, JSON_PLAIN)
                return
            await w.json(200, self.state(), JSON_PLAIN)
        else:
            await w.respond(404, b"404 page not found", "text/plain")

    def control(self, body: dict[str, Any]) -> None:
        """Apply a control document: knobs plus ``add_models``, ``remove_models``,
        ``clear_requests`` and ``clear_faults``."""
        body = dict(body)
        for name in body.pop("add_models", []):
            self.add_model(name)
        for name in body.pop("remove_models", []):
            self.remove_model(name)
        if body.pop("clear_requests", False):
            self.requests.clear()
        if body.pop("clear_faults", False):
            self.clear_faults()
        self.set(**body)


async def serve_fake(
    models: Iterable[str] = DEFAULT_MODELS,
    port: int = 0,
    *,
    name: str = "fake",
    token_delay: float = 0.01,
    tokens: int = 8,
    host: str = "127.0.0.1",
    host_check: bool = True,
    text: str | None = None,
    models_dir: str | Path | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Start a fresh :class:`FakeOllama` on ``host:port``; ``started()`` hands it over."""
    fake = FakeOllama(models, name=name, token_delay=token_delay, tokens=tokens, host_check=host_check, text=text,
                      models_dir=models_dir)
    await fake.serve(port, host, task_status=task_status)


# --- subprocess mode ---------------------------------------------------------

LISTENING = "FAKE_OLLAMA_LISTENING"


@dataclass
class FakeProcess:
    """A fake running as a child process (see :func:`run_fake_process`)."""

    process: trio.Process
    url: str
    port: int

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.request(method, self.url + path, json=body)
            r.raise_for_status()
            return r.json()

    async def control(self, **knobs: Any) -> dict[str, Any]:
        return await self._call("POST", "/_fake/control", knobs)

    async def requests(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/_fake/requests")

    async def state(self) -> dict[str, Any]:
        return await self._call("GET", "/_fake/state")


@asynccontextmanager
async def run_fake_process(
    models: Iterable[str] = DEFAULT_MODELS,
    *,
    name: str = "fake",
    port: int = 0,
    token_delay: float | None = None,
    tokens: int | None = None,
    text: str | None = None,
    models_dir: str | Path | None = None,
    extra_args: Sequence[str] = (),
) -> AsyncIterator[FakeProcess]:
    """Run ``python -m tests.fakes.fake_ollama`` and stop it (SIGTERM, then SIGKILL) on exit.

    The bound port comes back on the child's stdout, so no polling is needed.
    """
    cmd = [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", str(port), "--name", name]
    cmd += ["--models", ",".join(models)]
    if token_delay is not None:
        cmd += ["--token-delay", str(token_delay)]
    if tokens is not None:
        cmd += ["--tokens", str(tokens)]
    if text is not None:
        cmd += ["--text", text]
    if models_dir is not None:
        cmd += ["--models-dir", str(models_dir)]
    cmd += list(extra_args)
    proc = await trio.lowlevel.open_process(cmd, cwd=str(REPO_ROOT), stdout=subprocess.PIPE)
    try:
        buf = b""
        while b"\n" not in buf:
            data = await proc.stdout.receive_some(4096)
            if not data:
                raise RuntimeError(f"fake ollama exited before listening (rc={await proc.wait()})")
            buf += data
        line = next(ln for ln in buf.decode().splitlines() if ln.startswith(LISTENING))
        url = line.split()[1]
        yield FakeProcess(proc, url, int(url.rsplit(":", 1)[1]))
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await proc.stdout.aclose()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.fakes.fake_ollama", description="A stand-in Ollama server for tests."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--token-delay", type=float, default=0.01)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--name", default="fake", help="appears in generated text: 'hello from NAME'")
    p.add_argument("--text", help="generate these words instead (see Knobs.text; --tokens still caps them)")
    p.add_argument("--no-host-check", action="store_true", help="accept any Host header")
    p.add_argument("--models-dir", help="also hold the models of this Ollama models directory (rescanned per request)")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    models = [m for m in args.models.split(",") if m.strip()]
    fake = FakeOllama(
        models,
        name=args.name,
        token_delay=args.token_delay,
        tokens=args.tokens,
        host_check=not args.no_host_check,
        text=args.text,
        models_dir=args.models_dir,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve, args.port, args.host)
        if args.port_file:
            tmp = f"{args.port_file}.tmp"
            Path(tmp).write_text(str(fake.port))
            os.replace(tmp, args.port_file)
        print(f"{LISTENING} {fake.url}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        trio.run(_main, _parse_args(argv))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
