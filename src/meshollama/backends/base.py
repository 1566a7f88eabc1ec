"""The backend interface: how a node serves its own models.

A backend is an :class:`~meshollama.httpmsg.Upstream` (it answers Ollama-API
HTTP requests) that also knows what it serves (``models()``), how busy it is
(``load()``) and tells the mesh when either changes (``changed()``), so a new
heartbeat goes out at once instead of at the next tick.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, asynccontextmanager
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import trio

from ..catalog import LoadInfo, ModelInfo
from ..errors import UpstreamUnavailable
from ..httpmsg import ProxyRequest, ProxyResponse


@runtime_checkable
class Backend(Protocol):
    kind: str

    def models(self) -> tuple[ModelInfo, ...]: ...

    def load(self) -> LoadInfo: ...

    def changed(self) -> trio.Event: ...

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None: ...

    def open(self, request: ProxyRequest) -> AbstractAsyncContextManager[ProxyResponse]: ...


class ChangeNotifier:
    """Hands out a ``trio.Event`` that fires on the next change, then a fresh one."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def changed(self) -> trio.Event:
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()


class NoBackend(ChangeNotifier):
    """``--backend none``: a pure gateway node that serves no models."""

    kind = "none"

    def models(self) -> tuple[ModelInfo, ...]:
        return ()

    def load(self) -> LoadInfo:
        return LoadInfo(in_flight=0, capacity=0, queued=0)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    @asynccontextmanager
    async def open(self, request: ProxyRequest) -> AsyncIterator[ProxyResponse]:
        raise UpstreamUnavailable("this node serves no models (backend: none)")
        yield  # pragma: no cover
