"""What happened to a request, seen from the client: the fault suite's one question.

Every request through the mesh must end complete or with an explicit error,
whatever fails underneath. :func:`classify` sorts a response into one of four
:class:`Fate` s from what a client received (status, content type, body bytes,
whether its deadline expired, whether its HTTP library raised); it is pure, so
it is tested with literal bytes (``test_fates``). :func:`send` does the I/O
for one request and classifies it; :class:`Tally` collects a load run.

* COMPLETE: the body ended with its final object (an NDJSON line with
  ``"done": true``; SSE ``data: [DONE]``, or Anthropic's ``message_stop`` /
  the Responses API's ``response.completed``; a 2xx JSON body) and no error.
* ERROR: the client was told: an HTTP error status, an ``{"error": ...}``
  NDJSON line or object, an SSE error event, or a body cut at the transport
  level (the client's HTTP library raises: that is how a gateway signals a
  failure once a non-streamed 200 has started).
* HUNG: the client's own deadline expired. It wins over everything else: a
  stream that never closes hangs every client that reads to the end (the
  ``openai`` client drains the stream after ``[DONE]``), even one that was
  told of an error first.
* TRUNCATED: the body ended cleanly but without its final object and without
  an error, or with a line that does not parse: the silent failure a client
  cannot tell from a short answer. It must never happen.
"""

from __future__ import annotations

import collections
import enum
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import trio


class Fate(enum.Enum):
    COMPLETE = "complete"
    ERROR = "error"
    HUNG = "hung"
    TRUNCATED = "truncated"


@dataclass(frozen=True)
class Outcome:
    """One request's fate and what came with it."""

    fate: Fate
    text: str = ""  # the answer text received, even when it did not complete
    final: Any = None  # the final object (done line, last SSE event, JSON body) or None
    peers: tuple[str, ...] = ()  # from a ``"meshollama": {"peers": [...]}`` field
    error: str | None = None  # the explicit error's message, or the transport error
    reason: str = ""  # why this fate: for assertion messages
    path: str = ""
    status: int | None = None
    elapsed: float | None = None  # seconds, when :func:`send` measured it

    def __str__(self) -> str:
        bits = [self.fate.value, self.path, f"status={self.status}"]
        if self.reason:
            bits.append(self.reason)
        if self.error and self.error not in self.reason:
            bits.append(f"error={self.error!r}")
        if self.elapsed is not None:
            bits.append(f"{self.elapsed:.2f}s")
        bits.append(f"text={_clip(self.text)!r}")
        return " ".join(bits)


# --- classify (pure) ---------------------------------------------------------


def classify(
    path: str,
    status: int | None,
    content_type: str | None,
    body: bytes,
    *,
    hung: bool = False,
    transport_error: str | None = None,
) -> Outcome:
    """The fate of a response to ``path`` (see the module docstring for the rules).

    ``status`` is None when no response head arrived (then ``transport_error``
    or ``hung`` says why).
    """
    base = {"path": path, "status": status}
    if status is not None and status >= 400 and not hung:
        message = _error_body(body) or f"HTTP {status}"
        return Outcome(Fate.ERROR, error=message, reason=f"HTTP {status}", **base)
    parsed = _parse(_kind(content_type, body), body)
    base.update(text=parsed.text, final=parsed.final, peers=parsed.peers)
    if hung:
        why = "client deadline expired"
        if transport_error:
            why += f" ({transport_error})"
        if parsed.error is not None:
            why += f" after an error {parsed.error!r}"
        elif parsed.complete:
            why += " after the final object: the stream never closed"
        return Outcome(Fate.HUNG, error=parsed.error or transport_error, reason=why, **base)
    if parsed.error is not None:
        why = "error in body" + (f", then {transport_error}" if transport_error else "")
        return Outcome(Fate.ERROR, error=parsed.error, reason=why, **base)
    if transport_error is not None:
        return Outcome(Fate.ERROR, error=transport_error, reason=f"transport: {transport_error}", **base)
    if status is None:
        return Outcome(Fate.TRUNCATED, reason="no response and no error", **base)
    if not 200 <= status < 300:
        return Outcome(Fate.TRUNCATED, reason=f"unexpected status {status}", **base)
    if parsed.complete:
        return Outcome(Fate.COMPLETE, reason="", **base)
    return Outcome(Fate.TRUNCATED, reason=parsed.problem or "no final object", **base)


@dataclass
class _Parsed:
    text: str = ""
    final: Any = None
    peers: tuple[str, ...] = ()
    error: str | None = None  # the first explicit error
    complete: bool = False
    problem: str | None = None  # why not complete, when there is no error


_NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")
# Terminal events of the SSE streams that do not end with [DONE].
_SSE_FINAL_TYPES = ("message_stop", "response.completed")
_SSE_ERROR_TYPES = ("error", "response.failed")


def _kind(content_type: str | None, body: bytes) -> str:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct == "text/event-stream":
        return "sse"
    if ct in _NDJSON_TYPES:
        return "ndjson"
    if ct == "application/json" or ct.endswith("+json"):
        return "json"
    head = body.lstrip()
    if head.startswith((b"data:", b"event:", b":")):
        return "sse"
    return "ndjson" if b"\n" in body.strip() else "json"


def _parse(kind: str, body: bytes) -> _Parsed:
    return {"sse": _parse_sse, "ndjson": _parse_ndjson}.get(kind, _parse_json)(body)


def _parse_json(body: bytes) -> _Parsed:
    out = _Parsed()
    try:
        obj = json.loads(body)
    except ValueError:
        out.problem = f"body is not JSON: {_clip(body)!r}"
        return out
    if isinstance(obj, dict) and obj.get("error") is not None:
        out.error = _message(obj["error"])
        return out
    out.text, out.final, out.peers, out.complete = _text_of(obj, whole=True), obj, _peers(obj), True
    return out


def _parse_ndjson(body: bytes) -> _Parsed:
    out = _Parsed()
    parts: list[str] = []
    lines = [ln for ln in body.split(b"\n") if ln.strip()]
    if not lines:
        out.problem = "empty body"
    for i, raw in enumerate(lines, 1):
        try:
            obj = json.loads(raw)
        except ValueError:
            out.problem = out.problem or f"line {i} is not JSON: {_clip(raw)!r}"
            continue
        if not isinstance(obj, dict):
            out.problem = out.problem or f"line {i} is not an object"
            continue
        if obj.get("error") is not None:
            out.error = out.error if out.error is not None else _message(obj["error"])
            continue
        parts.append(_text_of(obj, whole=False))
        out.peers = _peers(obj) or out.peers
        if obj.get("done") is True:
            out.final = obj
    out.text = "".join(parts)
    if out.final is None:
        out.problem = out.problem or "no line with done true"
    out.complete = out.final is not None and out.problem is None
    return out


def _parse_sse(body: bytes) -> _Parsed:
    out = _Parsed()
    parts: list[str] = []
    done = False
    text = body.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        name, data = _sse_event(block)
        if data is None:
            continue
        if data.strip() == "[DONE]":
            done = True
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            out.problem = out.problem or f"event is not JSON: {_clip(data)!r}"
            continue
        kind = obj.get("type") if isinstance(obj, dict) else None
        errs = isinstance(obj, dict) and obj.get("error") is not None
        if errs or name in _SSE_ERROR_TYPES or kind in _SSE_ERROR_TYPES:
            out.error = out.error if out.error is not None else _event_error(obj)
            continue
        parts.append(_text_of(obj, whole=False))
        out.peers = _peers(obj) or out.peers
        out.final = obj
        done = done or kind in _SSE_FINAL_TYPES or name in _SSE_FINAL_TYPES
    out.text = "".join(parts)
    if not done:
        out.final = None
        out.problem = out.problem or "no [DONE] or final event"
    out.complete = done and out.problem is None
    return out


def _sse_event(block: str) -> tuple[str | None, str | None]:
    """An SSE event's name and data (None when the block holds no data)."""
    name, data = None, []
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    return name, ("\n".join(data) if data else None)


def _event_error(obj: Any) -> str:
    """An SSE error event's message (OpenAI-style ``error``, or a failed Responses API ``response``)."""
    if isinstance(obj, dict):
        for holder in (obj, obj.get("response")):
            if isinstance(holder, dict) and holder.get("error") is not None:
                return _message(holder["error"])
    return _message(obj)


def _text_of(obj: Any, *, whole: bool) -> str:
    """The answer text an object carries (Ollama, OpenAI chat and completions, Anthropic, Responses)."""
    if not isinstance(obj, dict):
        return ""
    message = obj.get("message")
    if isinstance(message, dict):
        return _str(message.get("content"))
    if "response" in obj and isinstance(obj["response"], str):
        return obj["response"]
    choices = obj.get("choices")
    if isinstance(choices, list):
        out = []
        for c in choices:
            if isinstance(c, dict) and c.get("index", 0) == 0:
                inner = c.get("message") if whole else c.get("delta")
                out.append(_str(inner.get("content")) if isinstance(inner, dict) else _str(c.get("text")))
        return "".join(out)
    delta = obj.get("delta")
    if obj.get("type") == "content_block_delta" and isinstance(delta, dict):
        return _str(delta.get("text"))
    if obj.get("type") == "response.output_text.delta":
        return _str(delta)
    if whole and isinstance(obj.get("content"), list):  # Anthropic messages
        return "".join(_str(b.get("text")) for b in obj["content"] if isinstance(b, dict))
    return ""


def _peers(obj: Any) -> tuple[str, ...]:
    ext = obj.get("meshollama") if isinstance(obj, dict) else None
    peers = ext.get("peers") if isinstance(ext, dict) else None
    return tuple(str(p) for p in peers) if isinstance(peers, list) else ()


def _message(err: Any) -> str:
    if isinstance(err, str):
        return err
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return json.dumps(err)


def _error_body(body: bytes) -> str | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300] or None
    if isinstance(obj, dict) and "error" in obj:
        return _message(obj["error"])
    return json.dumps(obj)[:300]


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _clip(value: str | bytes, n: int = 80) -> str | bytes:
    return value if len(value) <= n else value[: n // 2] + value[-n // 2 :]


# --- send (I/O) --------------------------------------------------------------


async def send(client: httpx.AsyncClient, path: str, payload: Any, *, deadline: float, url: str | None = None,
               on_head: Callable[[httpx.Headers], None] | None = None,
               on_chunk: Callable[[bytearray], Awaitable[None]] | None = None) -> Outcome:
    """POST ``payload`` to ``path``, read the whole answer within ``deadline`` seconds, and classify it.

    The answer is always read as a stream (whether the payload asks for
    streaming is the payload's business), so whatever arrived before a hang or
    a cut is kept. An ``httpx`` timeout counts as the client's deadline too.
    ``url``: where to send it when the client has no base URL (``path`` still
    names the format). ``on_head(headers)`` runs when the head arrives and
    ``await on_chunk(body_so_far)`` after each chunk, for callers that time the
    answer or act in the middle of it (kill the serving peer).
    """
    status: int | None = None
    content_type: str | None = None
    body = bytearray()
    transport_error: str | None = None
    hung = True
    start = trio.current_time()
    with trio.move_on_after(deadline):
        try:
            async with client.stream("POST", url or path, json=payload) as r:
                status, content_type = r.status_code, r.headers.get("content-type")
                if on_head is not None:
                    on_head(r.headers)
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if on_chunk is not None:
                        await on_chunk(body)
            hung = False
        except httpx.TimeoutException as e:
            transport_error = f"{type(e).__name__}: {e}"
        except httpx.TransportError as e:
            hung, transport_error = False, f"{type(e).__name__}: {e}"
    outcome = classify(path, status, content_type, bytes(body), hung=hung, transport_error=transport_error)
    return replace(outcome, elapsed=trio.current_time() - start)


# --- continuity --------------------------------------------------------------


def numbered_text(n: int, prefix: str = "w") -> str:
    """``"w001 w002 ... wNNN"``: a text whose every word is distinct, for the fake's ``text`` knob."""
    width = max(3, len(str(n)))
    return " ".join(f"{prefix}{i:0{width}d}" for i in range(1, n + 1))


def discontinuity(text: str, expected: str | Sequence[str]) -> str | None:
    """None when ``text`` is exactly the ``expected`` words in order, else where and how it differs."""
    want = expected.split() if isinstance(expected, str) else [w.strip() for w in expected]
    got = text.split()
    if got == want:
        return None
    i = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    if i == len(got):
        return f"ends after word {i} of {len(want)}: missing {want[i:i + 3]}"
    if i == len(want):
        return f"{len(got) - i} extra words after the last: {got[i:i + 3]}"
    kind = "differs"
    if i > 0 and got[i] in want[:i]:
        kind = "duplicate"
    elif got[i] in want[i + 1:]:
        kind = "missing words"
    return f"{kind} at word {i}: expected {want[i:i + 3]}, got {got[i:i + 3]}"


def continuous(text: str, expected: str | Sequence[str]) -> bool:
    """The answer ``text`` is the ``expected`` word sequence: no duplicate, missing or merged word."""
    return discontinuity(text, expected) is None


# --- tally -------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of a load run: counts per fate, and examples of the ones that did not complete."""

    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome

    @property
    def counts(self) -> collections.Counter[Fate]:
        return collections.Counter(o.fate for o in self.outcomes)

    def count(self, fate: Fate) -> int:
        return sum(1 for o in self.outcomes if o.fate is fate)

    @property
    def lost(self) -> list[Outcome]:
        """The requests that hung or ended silently: never acceptable."""
        return [o for o in self.outcomes if o.fate in (Fate.HUNG, Fate.TRUNCATED)]

    def examples(self, limit: int = 3) -> dict[Fate, list[Outcome]]:
        out: dict[Fate, list[Outcome]] = {}
        for o in self.outcomes:
            if o.fate is not Fate.COMPLETE and len(out.setdefault(o.fate, [])) < limit:
                out[o.fate].append(o)
        return out

    def summary(self, limit: int = 3) -> str:
        counts = self.counts
        head = ", ".join(f"{f.value}={counts.get(f, 0)}" for f in Fate)
        lines = [f"{len(self.outcomes)} requests: {head}"]
        for fate, outs in self.examples(limit).items():
            lines += [f"  {fate.value}: {o}" for o in outs]
        return "\n".join(lines)

    def assert_none_lost(self) -> None:
        assert not self.lost, self.summary()

    def __str__(self) -> str:
        return self.summary()
