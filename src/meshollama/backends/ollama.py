"""The Ollama backend: serve this node's models through an Ollama server.

Two jobs, kept apart:

* **What we announce.** :meth:`OllamaBackend.serve` polls ``/api/tags`` and
  ``/api/ps`` every ``refresh_interval`` seconds, and at once after a
  pull/create/delete/copy went through :meth:`~OllamaBackend.open` (or a
  request for a model that was not loaded succeeded), so a new or newly
  loaded model is announced without waiting for the timer. When Ollama cannot be
  reached the node announces no models, keeps polling, and logs once per
  change of state, not once per poll. Turning Ollama's JSON into
  :class:`~meshollama.catalog.ModelInfo` is a pure function,
  :func:`parse_models`.

* **Answering requests.** :meth:`~OllamaBackend.open` forwards one request
  with a shared ``httpx.AsyncClient`` and hands back status, headers and the
  raw body bytes as Ollama sent them (``aiter_raw``, ``Accept-Encoding:
  identity``), so NDJSON and SSE streams reach the caller chunk by chunk and
  byte for byte. There is a connect timeout but no read timeout: Ollama's own
  server has none, and a generation may legitimately run for many minutes.
  ``Host`` is rewritten to Ollama's own address because a loopback-bound
  Ollama answers 403 to any other host name. Leaving the context closes the
  HTTP response, which drops the connection, which makes Ollama cancel the
  generation and free its slot.

Status codes from Ollama, 503 "server busy" included, are passed through as
responses, never raised: Ollama's error bodies are part of the API. Only
failures to get a response raise :class:`~meshollama.errors.UpstreamUnavailable`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .. import names
from ..catalog import RUNNING_FACTS, LoadInfo, ModelInfo
from ..errors import ConfigError, UpstreamBroken, UpstreamUnavailable
from ..httpmsg import ProxyRequest, ProxyResponse, content_length, forwardable
from .base import ChangeNotifier

log = logging.getLogger("meshollama.backend.ollama")

DEFAULT_URL = "http://127.0.0.1:11435"

# Requests that change Ollama's model list: refresh as soon as they finish.
MODEL_CHANGING_PATHS = frozenset({"/api/pull", "/api/create", "/api/delete", "/api/copy"})

# /api/tags is served from a cache and is quick, but a machine busy with a
# big generation can be slow to answer anything: give it more than the
# connect timeout before declaring Ollama down.
TAGS_READ_TIMEOUT = 10.0


def split_url(url: str) -> tuple[str, str]:
    """``(base_url, host_header)`` for an Ollama address.

    ``127.0.0.1:11435``, ``http://127.0.0.1:11435/`` and ``http://h/prefix``
    are accepted; the base has no trailing slash and always a port, the host
    header is ``host:port`` (IPv6 bracketed).
    """
    raw = url if "://" in url else f"http://{url}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("ollama.url", f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ConfigError("ollama.url", f"bad port in {url!r}") from e
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    hostport = f"{host}:{port}"
    return f"{parts.scheme}://{hostport}{parts.path.rstrip('/')}", hostport


def loaded_state(ps: Any) -> dict[str, dict[str, Any]]:
    """Loaded models from an ``/api/ps`` answer: model key -> the facts of
    :data:`RUNNING_FACTS` it reported (so the mesh-wide ``/api/ps`` shows
    Ollama's own ``expires_at``, e.g. far in the future for ``keep_alive: -1``)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in _entries(ps):
        name = entry.get("model") or entry.get("name")
        if isinstance(name, str) and name:
            facts = {}
            for k in RUNNING_FACTS:
                v = entry.get(k)
                if (isinstance(v, str) and k == "expires_at") or (isinstance(v, int) and not isinstance(v, bool)):
                    facts[k] = v
            out[names.key(name)] = facts
    return out


def loaded_keys(ps: Any) -> frozenset[str]:
    """Model keys (:func:`meshollama.names.key`) listed by an ``/api/ps`` answer."""
    return frozenset(loaded_state(ps))


def parse_models(
    tags: Any, loaded: Mapping[str, Mapping[str, Any]] | frozenset[str] = frozenset()
) -> tuple[ModelInfo, ...]:
    """``/api/tags`` JSON to ModelInfo tuples, in Ollama's order (newest first).

    Names are normalised to Ollama's short form; ``loaded`` holds the keys
    from :func:`loaded_keys`, or :func:`loaded_state`, whose running facts go
    into the model's ``details``. Malformed entries are skipped, not fatal:
    one odd model must not hide the others. A name listed twice is kept once.
    """
    out: list[ModelInfo] = []
    seen: set[str] = set()
    for entry in _entries(tags):
        name = entry.get("model") or entry.get("name")
        if not isinstance(name, str) or not names.is_valid(name):
            continue
        key = names.key(name)
        if key in seen:
            continue
        seen.add(key)
        digest = entry.get("digest")
        digest = digest.removeprefix("sha256:") if isinstance(digest, str) else ""
        size = entry.get("size")
        details = dict(entry.get("details")) if isinstance(entry.get("details"), Mapping) else {}
        if isinstance(loaded, Mapping) and key in loaded:
            details.update(loaded[key])
        caps = entry.get("capabilities")  # newer Ollama lists them; older ones do not
        out.append(
            ModelInfo(
                name=names.shortest(name),
                digest=digest,
                size=size if isinstance(size, int) and size >= 0 else 0,
                loaded=key in loaded,
                modified_at=str(entry.get("modified_at") or ""),
                details=details,
                capabilities=tuple(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else (),
            )
        )
    return tuple(out)


def _entries(doc: Any) -> list[Mapping[str, Any]]:
    models = doc.get("models") if isinstance(doc, Mapping) else None
    return [m for m in models if isinstance(m, Mapping)] if isinstance(models, list) else []


def request_model(request: ProxyRequest) -> str | None:
    """The model a request names in its JSON body, in short form; None if none."""
    body = request.body
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    name = (doc.get("model") or doc.get("name")) if isinstance(doc, dict) else None
    return names.shortest(name) if isinstance(name, str) and name else None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OllamaBackend(ChangeNotifier):
    """A :class:`~meshollama.backends.base.Backend` in front of one Ollama server.

    ``num_parallel`` is the capacity announced (Ollama's ``OLLAMA_NUM_PARALLEL``);
    ``probe_timeout`` bounds the connect of every poll and the whole
    ``/api/ps`` call; ``connect_timeout`` bounds connecting for forwarded
    requests. ``changed()`` fires when the model list changes and when
    ``in_flight`` changes at or above capacity (becoming full, queueing,
    draining); changes among free slots wait for the next heartbeat.
    """

    kind = "ollama"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        num_parallel: int = 1,
        refresh_interval: float = 5.0,
        probe_timeout: float = 1.0,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.url, self.host_header = split_url(url)
        self.num_parallel = max(1, int(num_parallel))
        self.refresh_interval = refresh_interval
        self.probe_timeout = probe_timeout
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            trust_env=False,  # never send local-model traffic through an HTTP(S)_PROXY
            follow_redirects=False,
        )
        self._models: tuple[ModelInfo, ...] = ()
        self._loaded: dict[str, dict[str, Any]] = {}
        self._up: bool | None = None  # None: not polled yet
        self._in_flight = 0
        self._by_model: Counter[str] = Counter()
        self._wake = trio.Event()

    # -- what we announce --

    @property
    def up(self) -> bool | None:
        """Whether the last poll reached Ollama (None before the first poll)."""
        return self._up

    def models(self) -> tuple[ModelInfo, ...]:
        return self._models

    def load(self) -> LoadInfo:
        # Requests past the slots wait inside Ollama: queued, not also in flight (routing
        # adds the two; counting them twice made a saturated Ollama look twice as busy).
        n, slots = self._in_flight, self.num_parallel
        return LoadInfo(in_flight=min(n, slots), capacity=slots, queued=max(0, n - slots))

    def in_flight_by_model(self) -> dict[str, int]:
        """Requests in flight per model (short names), for metrics."""
        return {k: v for k, v in self._by_model.items() if v}

    def refresh_soon(self) -> None:
        """Ask the poll loop to refresh now instead of at the next tick."""
        self._wake.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Poll Ollama until cancelled; ready once the first poll finished (either way)."""
        try:
            await self.refresh()
            task_status.started()
            while True:
                with trio.move_on_after(self.refresh_interval):
                    await self._wake.wait()
                # A fresh Event *before* polling: a wake-up during the poll is kept.
                self._wake = trio.Event()
                await self.refresh()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client; :meth:`serve` does this when it ends."""
        await self._client.aclose()

    async def refresh(self) -> bool:
        """Poll ``/api/tags`` and ``/api/ps`` once; returns whether Ollama answered."""
        try:
            tags = await self._get_json("/api/tags", httpx.Timeout(TAGS_READ_TIMEOUT, connect=self.probe_timeout))
        except (httpx.HTTPError, ValueError, RuntimeError) as e:
            self._went_down(e)
            return False
        try:
            # /api/ps can block while a model loads (Ollama >= 0.32.4): on a
            # timeout keep the last answer rather than calling Ollama down.
            self._loaded = loaded_state(await self._get_json("/api/ps", httpx.Timeout(self.probe_timeout)))
        except (httpx.HTTPError, ValueError) as e:
            log.debug("GET /api/ps failed (%s); keeping the last loaded set", _describe(e))
        self._came_up(parse_models(tags, self._loaded))
        return True

    async def _get_json(self, path: str, timeout: httpx.Timeout) -> Any:
        headers = {"host": self.host_header, "accept-encoding": "identity"}
        r = await self._client.get(self.url + path, headers=headers, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def _went_down(self, exc: BaseException) -> None:
        if self._up is not False:
            log.warning(
                "Ollama at %s is unreachable (%s); announcing no models, retrying every %gs",
                self.url,
                _describe(exc),
                self.refresh_interval,
            )
        self._up = False
        if self._models:
            self._models = ()
            self.notify()

    def _came_up(self, models: tuple[ModelInfo, ...]) -> None:
        if self._up is not True:
            log.info("Ollama at %s is up with %d model(s)", self.url, len(models))
        self._up = True
        if models != self._models:
            self._models = models
            self.notify()

    # -- answering requests --

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        model = request_model(request)
        path = request.path.partition("?")[0]
        status = 0
        self._begin(model)
        try:
            try:
                response = await self._client.send(self._build(request), stream=True)
            except (httpx.HTTPError, httpx.InvalidURL, RuntimeError) as e:
                # RuntimeError: the client was closed because serve() ended.
                self.refresh_soon()
                raise UpstreamUnavailable(f"Ollama at {self.url}: {_describe(e)}") from e
            try:
                status = response.status_code
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw)
                # Content-Length stays: the body is relayed unchanged (we ask for identity encoding).
                yield ProxyResponse(status, forwardable(headers) + content_length(headers), self._body(response))
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()  # mid-body this drops the connection: Ollama stops
        finally:
            self._end(model)
            # After a pull/create/copy/delete the model list changed; after a
            # request that loaded a cold model, /api/ps did: announce either now.
            # keep_alive (0 unloads, -1 pins) changes what /api/ps says, too.
            if (path in MODEL_CHANGING_PATHS or (status == 200 and model and not self._is_loaded(model))
                    or b'"keep_alive"' in request.body):
                self.refresh_soon()

    def _build(self, request: ProxyRequest) -> httpx.Request:
        # Hop-by-hop: the fixed list, plus whatever the Connection header names (RFC 9110 §7.6.1).
        named = {t.strip().lower() for k, v in request.headers if k.lower() == "connection" for t in v.split(",")}
        headers = [(k, v) for k, v in forwardable(request.headers) if k not in named]
        headers += [("host", self.host_header), ("accept-encoding", "identity")]
        # httpx.Request, not client.build_request: the client's default
        # headers (its User-Agent, Accept) must not replace the caller's.
        if request.stream is not None:  # an upload passed through as it arrives (blobs)
            if request.stream_length is not None:
                headers.append(("content-length", str(request.stream_length)))
            return httpx.Request(request.method, self.url + request.path, headers=headers, content=request.stream)
        send_body = bool(request.body) or request.method.upper() not in ("GET", "HEAD")
        return httpx.Request(
            request.method, self.url + request.path, headers=headers, content=request.body if send_body else None
        )

    async def _body(self, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except (httpx.HTTPError, httpx.StreamError) as e:
            raise UpstreamBroken(f"Ollama at {self.url} broke off the response: {_describe(e)}") from e

    def _is_loaded(self, model: str) -> bool:
        key = names.key(model)
        return any(m.loaded for m in self._models if names.key(m.name) == key)

    def _begin(self, model: str | None) -> None:
        self._in_flight += 1
        if model:
            self._by_model[model] += 1
        self._load_changed(self._in_flight - 1)

    def _end(self, model: str | None) -> None:
        self._in_flight -= 1
        if model:
            self._by_model[model] -= 1
            if self._by_model[model] <= 0:
                del self._by_model[model]
        self._load_changed(self._in_flight + 1)

    def _load_changed(self, before: int) -> None:
        # Free slots changing hardly matters to routers; queueing does. The
        # mesh rate-limits the heartbeats this triggers.
        if max(before, self._in_flight) >= self.num_parallel:
            self.notify()
