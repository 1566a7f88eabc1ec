"""A tiny OTLP/HTTP receiver for tests: ``POST /v1/traces`` with JSON, checked against the spec's shape.

A raw h11 server on trio sockets (no ASGI stack between the exporter and
what is checked), on 127.0.0.1 and an OS-chosen port::

    receiver = await nursery.start(serve_receiver)
    ... export to receiver.url ...
    await receiver.wait_for(lambda: len(receiver.spans()) >= 5)

Every export is checked by :func:`problems` (the OTLP JSON mapping:
``resourceSpans`` > ``scopeSpans`` > ``spans``, hex ids, times as decimal
strings, kinds and status codes in range); what is wrong is kept in
``receiver.problems`` rather than raised, so a test asserts it is empty.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import h11
import trio

_HEX = {32: re.compile(r"[0-9a-f]{32}\Z"), 16: re.compile(r"[0-9a-f]{16}\Z")}
_VALUE_KINDS = {"stringValue", "boolValue", "intValue", "doubleValue", "arrayValue", "kvlistValue", "bytesValue"}


@dataclass
class Receiver:
    url: str
    exports: list[dict] = field(default_factory=list)  # each POST's JSON document
    problems: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def spans(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(resource attributes as a plain dict, span) for every span received."""
        out = []
        for doc in self.exports:
            for rs in doc.get("resourceSpans", []):
                resource = {a["key"]: next(iter(a["value"].values())) for a in rs["resource"]["attributes"]}
                for ss in rs["scopeSpans"]:
                    out.extend((resource, span) for span in ss["spans"])
        return out

    def _record(self, doc: Any, problems: list[str]) -> None:
        self.problems.extend(problems)
        if not problems:
            self.exports.append(doc)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


def problems(doc: Any) -> list[str]:
    """What in an OTLP JSON ExportTraceServiceRequest breaks the spec's shape."""
    found: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            found.append(what)

    def attributes(attrs: Any, where: str) -> None:
        check(isinstance(attrs, list), f"{where}: attributes not a list")
        for a in attrs if isinstance(attrs, list) else []:
            check(isinstance(a.get("key"), str) and isinstance(a.get("value"), dict)
                  and len(a["value"]) == 1 and set(a["value"]) <= _VALUE_KINDS, f"{where}: bad attribute {a!r}")
            if "intValue" in a.get("value", {}):
                check(re.fullmatch(r"-?\d+", str(a["value"]["intValue"])) is not None, f"{where}: bad int {a!r}")

    check(isinstance(doc, dict) and isinstance(doc.get("resourceSpans"), list), "no resourceSpans list")
    for rs in doc.get("resourceSpans", []) if isinstance(doc, dict) else []:
        attributes(rs.get("resource", {}).get("attributes"), "resource")
        check(isinstance(rs.get("scopeSpans"), list), "no scopeSpans list")
        for ss in rs.get("scopeSpans", []):
            check(isinstance(ss.get("scope", {}).get("name"), str), "scope without a name")
            for span in ss.get("spans", []):
                where = f"span {span.get('name')!r}"
                check(bool(_HEX[32].match(str(span.get("traceId")))) and set(span["traceId"]) != {"0"},
                      f"{where}: traceId")
                check(bool(_HEX[16].match(str(span.get("spanId")))), f"{where}: spanId")
                if "parentSpanId" in span:
                    check(bool(_HEX[16].match(str(span["parentSpanId"]))), f"{where}: parentSpanId")
                check(isinstance(span.get("name"), str) and span["name"], f"{where}: name")
                check(span.get("kind") in (0, 1, 2, 3, 4, 5), f"{where}: kind")
                times = [span.get("startTimeUnixNano"), span.get("endTimeUnixNano")]
                check(all(isinstance(t, str) and t.isdigit() for t in times), f"{where}: times not decimal strings")
                if all(isinstance(t, str) and t.isdigit() for t in times):
                    check(int(times[0]) <= int(times[1]), f"{where}: ends before it starts")
                attributes(span.get("attributes", []), where)
                for event in span.get("events", []):
                    check(str(event.get("timeUnixNano", "")).isdigit() and isinstance(event.get("name"), str),
                          f"{where}: bad event {event!r}")
                    attributes(event.get("attributes", []), where)
                status = span.get("status", {})
                check(status.get("code", 0) in (0, 1, 2), f"{where}: status code")
    return found


async def serve_receiver(*, task_status: trio.TaskStatus[Receiver] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    receiver = Receiver(f"http://127.0.0.1:{port}")
    task_status.started(receiver)
    await trio.serve_listeners(partial(_connection, receiver), listeners)


async def _connection(receiver: Receiver, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request, body = event, bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                status, answer = _answer(receiver, request, bytes(body))
                headers = [("content-type", "application/json"), ("content-length", str(len(answer)))]
                for ev in (h11.Response(status_code=status, headers=headers), h11.Data(data=answer),
                           h11.EndOfMessage()):
                    await stream.send_all(conn.send(ev))
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


def _answer(receiver: Receiver, request: h11.Request, body: bytes) -> tuple[int, bytes]:
    if request.method != b"POST" or request.target != b"/v1/traces":
        receiver._record(None, [f"unexpected {request.method!r} {request.target!r}"])
        return 404, b"{}"
    ctype = dict((k.lower(), v) for k, v in request.headers).get(b"content-type", b"")
    try:
        doc = json.loads(body)
    except ValueError:
        receiver._record(None, ["body is not JSON"])
        return 400, b"{}"
    found = problems(doc) + ([] if ctype.startswith(b"application/json") else [f"content-type {ctype!r}"])
    receiver._record(doc, found)
    return (400 if found else 200), b"{}"
