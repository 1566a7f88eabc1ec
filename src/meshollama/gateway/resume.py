"""Mid-stream resume: a sans-IO relay that continues a broken answer on another peer.

When the peer streaming an answer dies, freezes or stalls, the client has
already read part of the answer (and the 200 head): retrying is no longer
possible, but continuing is. Ollama continues a final assistant message, so
the same model on another peer, asked the same question with the text sent
so far as the assistant's message, writes the rest. The client sees one
stream: no text twice, none missing, one final object counting the whole
answer, with a ``meshollama`` field naming every peer that served it.

:class:`StreamRelay` is that logic without I/O (in the manner of
mitmproxy's layers and h11): the proxy feeds it upstream bytes and events
and sends what it returns; which peer to try and every timeout stay with
the caller. One relay serves one request::

    relay = StreamRelay(path, payload)
    relay.commit(peer, content_type)          # first upstream answered 200, body started
    send(relay.feed(chunk))  ...               # for each upstream chunk
    complete, rest = relay.end()               # the upstream body ended cleanly
    send(rest)
    if not complete: verdict = relay.broke("truncated", spent)
    # on a reset / stall / kill mid-stream:  verdict = relay.broke(reason, spent)
    # Continuation -> send it to another peer; when it answers 200 and its body
    #     starts: relay.resumed(peer, content_type), then feed/end as above. If that
    #     peer fails before its first byte, try the same Continuation elsewhere.
    # GiveUp -> send verdict.tail, end the response (tail b"": cut the connection).
    # Finished -> send verdict.tail, end the response normally.
    # no peer left for a Continuation -> send(relay.give_up(reason)), end it.

Streams are cut only at line (NDJSON) or event (SSE) boundaries: a partial
line is held back until complete, so a break never leaves half a JSON line
at the client. An unbroken stream reaches the client byte for byte, and only
streams on the four generation paths are parsed at all.

Never continued (the break ends the stream with an explicit error):
``resume=False``; tools, structured output, ``n`` > 1, logprobs, suffix,
echo, a generate ``context`` or ``template``; tool calls seen in the stream.
A break before any text or thinking reached the client retries the request
unchanged, whatever it asks. /api/generate without ``raw`` and
/v1/completions continue as /api/chat (the prompt as the user's message),
translated back into the client's format; their final object then has no
``context``.

The counts of a resumed answer are estimates: output = the pieces relayed
before the break (chunks that carried text or thinking, about one token
each) plus the continuation's count; prompt = the continuation's prompt
count minus those pieces (its prompt held them as the assistant message);
``total_duration`` adds the broken upstreams' ``spent`` time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import dumps, ndjson_error_line, sse_error_event
from .resume_shapes import (
    GENERATE,
    MESH_KEY,
    RESUMABLE,
    SSE_DONE,
    SSE_PATHS,
    TEMPLATE_KEYS,
    V1_CHAT,
    Cutter,
    Piece,
    closing,
    completion_chunk,
    continuation_request,
    generate_chunk,
    generate_final,
    length_limit,
    line,
    mesh_field,
    openai_usage,
    parse,
    patch_native_final,
    refusal,
    sse,
    usage_chunk,
)

__all__ = ["Continuation", "Finished", "GiveUp", "StreamRelay", "Verdict"]

WAITING, COMMITTED, RESUMING, DONE_STATE, FAILED = "waiting", "committed", "resuming", "done", "failed"
MAX_RESUMES = 4  # continuations of one answer; a peer set that keeps failing must not loop


@dataclass(frozen=True)
class Continuation:
    """Send this to the next peer; relay its answer after :meth:`StreamRelay.resumed`."""

    path: str  # "/api/chat" | "/api/generate" | "/v1/chat/completions" | "/v1/completions"
    body: bytes  # JSON request body


@dataclass(frozen=True)
class GiveUp:
    """The stream cannot continue: send ``tail`` (an explicit error in the
    stream's envelope) and end the response; ``tail`` b"": cut the connection
    so the client sees an incomplete body (not a stream we can end with an error)."""

    message: str
    tail: bytes


@dataclass(frozen=True)
class Finished:
    """The answer needs no other peer: send ``tail`` and end the response
    normally. ``tail`` is the end we write ourselves (the length limit was
    already reached when the stream broke; an OpenAI stream broke after its
    finish chunk, so only the usage chunk and ``[DONE]`` were missing), or b""
    (the final object had already gone out)."""

    tail: bytes
    message: str = ""


Verdict = Continuation | GiveUp | Finished


class StreamRelay:
    """Relays one streamed answer across upstream failures (see the module docstring).

    ``path``: the client's request path; only /api/chat, /api/generate,
    /v1/chat/completions and /v1/completions streams are tracked and resumable,
    anything else is passed through untouched. ``payload``: the parsed request.
    ``resume``: False keeps the relay's bookkeeping but never continues: every
    break ends with an explicit error, as before resume existed. ``body``: the
    request's bytes, sent as they are when the answer is retried before any of
    it reached the client (else ``payload`` re-encoded). ``max_resumes``: the
    continuations one answer may take.

    Attributes: ``state`` (``waiting`` -> ``committed`` -> (``resuming`` ->
    ``committed``)* -> ``done`` | ``failed``), ``peers`` (in serving order),
    ``resumes``, ``text`` and ``thinking`` (relayed so far), ``pieces``
    (chunks that carried text or thinking: the tokens, roughly), ``tool_calls``.
    """

    def __init__(self, path: str, payload: dict, *, resume: bool = True, body: bytes | None = None,
                 max_resumes: int = MAX_RESUMES) -> None:
        self.path = path
        self.payload = payload if isinstance(payload, dict) else {}
        self.resume = resume
        self.max_resumes = max_resumes
        self.state = WAITING
        self.peers: list[str] = []
        self.resumes = 0
        self.pieces = 0
        self.tool_calls = False
        self._body = body
        self._texts: list[str] = []
        self._thinks: list[str] = []
        self._tracked = False  # a stream we parse (else raw pass-through)
        self._client_sse = path in SSE_PATHS
        self._cut = Cutter(self._client_sse)
        self._upstream = path  # the format the current upstream speaks (its request path)
        self._original = True  # the current upstream is the first: its bytes go out unchanged
        self._before = 0  # pieces relayed before the current upstream started
        self._spent_ns = 0
        self._pending: Continuation | None = None
        self._tail = b""  # the last bytes sent to the client
        model = self.payload.get("model")
        self._model = model if isinstance(model, str) else ""  # native: the first chunk's
        self._created_at = ""  # native: the latest chunk's (for a final written here)
        self._templated = False
        object_ = "chat.completion.chunk" if path == V1_CHAT else "text_completion"
        self._template: dict[str, Any] = {"id": "", "object": object_, "created": 0, "model": self._model,
                                          "system_fingerprint": "fp_ollama"}
        self._finish: str | None = None  # OpenAI: the finish_reason relayed
        self._usage_seen = False
        options = self.payload.get("stream_options")
        self._include_usage = bool(isinstance(options, dict) and options.get("include_usage"))

    @property
    def held(self) -> int:
        """Bytes held back (a line or event not complete yet): the caller bounds it."""
        return len(self._cut.buf)

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def thinking(self) -> str:
        return "".join(self._thinks)

    # --- events -------------------------------------------------------------

    def commit(self, peer: str, content_type: str) -> None:
        """The first upstream answered and its body started: the answer is its."""
        self._expect(WAITING, "commit")
        self.peers.append(peer)
        self.state = COMMITTED
        ctype = content_type.lower()
        sse = "text/event-stream" in ctype
        self._tracked = self.path in RESUMABLE and (sse or "ndjson" in ctype) and sse == self._client_sse

    def feed(self, data: bytes) -> bytes:
        """Upstream body bytes in; the bytes to send the client now out."""
        if not self._tracked:
            if self.state == WAITING:
                raise RuntimeError("feed() before commit()")
            return data
        if self.state in (WAITING, RESUMING):
            raise RuntimeError(f"feed() while {self.state}")
        if self.state != COMMITTED:  # after the final object or an error line
            return self._sent(data) if self._original else b""
        region = self._cut.push(data)
        return self._relay(region) if region else b""

    def end(self) -> tuple[bool, bytes]:
        """The upstream body ended cleanly. Returns (complete, bytes to send);
        not complete: it ended before its final object, and the caller calls
        :meth:`broke`. An unterminated last line counts only if it is the final
        object or an error; anything else unterminated is dropped, unsent."""
        if not self._tracked:
            if self.state == COMMITTED:
                self.state = DONE_STATE
            return True, b""
        if self.state in (WAITING, RESUMING):
            raise RuntimeError(f"end() while {self.state}")
        rest = self._cut.take()
        if self.state != COMMITTED:
            return True, (self._sent(rest) if self._original else b"")
        unit = rest.strip(b"\r\n") if self._cut.sse else rest
        if unit.strip():
            piece, _ = self._parse(unit)
            if piece.final or piece.error is not None:
                return True, self._relay(rest, units=[unit])
        return False, b""

    def broke(self, reason: str, spent: float = 0.0) -> Verdict:
        """The current upstream failed mid-stream (reset, killed, stalled,
        truncated); ``spent``: the seconds it worked, added to the answer's
        ``total_duration``. Returns what to do next."""
        if self.state == WAITING:
            raise RuntimeError("broke() before commit()")
        self._spent_ns += max(0, int(spent * 1e9))
        peer = self.peers[-1]
        message = f"upstream {peer} failed mid-stream: {reason}"
        if not self._tracked or self.state == FAILED:
            self.state = FAILED
            return GiveUp(message, b"")
        if self.state == DONE_STATE:
            return Finished(b"", "the answer was already complete")
        if self.state == RESUMING:  # the continuation's peer failed before its first byte
            assert self._pending is not None
            return self._pending
        self._cut.take()  # a partial line never reaches the client
        if not self.resume:
            return self._refuse(message, "resume is disabled")
        if self._finish is not None:  # OpenAI: only the usage chunk and/or [DONE] are missing
            return self._finish_here(self._finish, finish_sent=True,
                                     message="the stream broke after its finish chunk")
        if self.tool_calls:
            return self._refuse(message, "tool calls were streamed")
        if self.resumes >= self.max_resumes:
            return self._refuse(message, f"it was resumed {self.resumes} times already")
        if not self._texts and not self._thinks:
            # Nothing of the answer reached the client: the request again, as it was.
            body = self._body if self._body is not None else dumps(self.payload)
            return self._continue(Continuation(self.path, body))
        why = refusal(self.path, self.payload)
        if why is None and self.path == GENERATE and self.payload.get("raw") and self._thinks:
            why = "a raw prompt cannot carry the thinking relayed"
        if why is not None:
            return self._refuse(message, why)
        limit = length_limit(self.path, self.payload)
        left = None if limit is None else limit - self.pieces
        if left is not None and left <= 0:
            return self._finish_here("length", finish_sent=False, message="the length limit was reached")
        path, body = continuation_request(self.path, self.payload, self.text, self.thinking, left)
        return self._continue(Continuation(path, dumps(body)))

    def resumed(self, peer: str, content_type: str) -> None:
        """The continuation's upstream answered and its body started. Raises
        ValueError if it is not the stream the continuation asked for (the
        caller then treats that peer as failed before its first byte)."""
        self._expect(RESUMING, "resumed")
        assert self._pending is not None
        path = self._pending.path
        ctype = content_type.lower()
        want = "text/event-stream" if path in SSE_PATHS else "ndjson"
        if want not in ctype:
            raise ValueError(f"continuation answered {content_type!r}, not a {want} stream")
        self.peers.append(peer)
        self.resumes += 1
        self._upstream = path
        self._original = False
        self._before = self.pieces
        self._cut = Cutter(path in SSE_PATHS)
        self._pending = None
        self.state = COMMITTED

    def give_up(self, reason: str) -> bytes:
        """No peer could continue: the bytes that end the client's stream with an explicit error."""
        if not self._tracked or self.state in (DONE_STATE, FAILED, WAITING):
            if self.state != DONE_STATE:
                self.state = FAILED
            return b""  # nothing to add: ended already, or not a stream we can end with an error
        self._cut.take()
        self.state = FAILED
        self._pending = None
        return self._error_tail(f"the answer broke off mid-stream and could not be resumed: {reason}")

    # --- decisions ------------------------------------------------------------

    def _expect(self, state: str, what: str) -> None:
        if self.state != state:
            raise RuntimeError(f"{what}() in state {self.state}")

    def _continue(self, continuation: Continuation) -> Continuation:
        self._pending = continuation
        self.state = RESUMING
        return continuation

    def _refuse(self, message: str, why: str) -> GiveUp:
        message = f"{message} (not resumed: {why})"
        self.state = FAILED
        return GiveUp(message, self._error_tail(message))

    def _finish_here(self, reason: str, *, finish_sent: bool, message: str) -> Finished:
        tail = closing(
            self.path, model=self._model, created_at=self._created_at, template=self._template, reason=reason,
            pieces=self.pieces, spent_ns=self._spent_ns, include_usage=self._include_usage and not self._usage_seen,
            mesh=self._mesh() if self.resumes else None, finish_sent=finish_sent)
        self.state = DONE_STATE
        return Finished(self._sent(tail), message)

    def _error_tail(self, message: str) -> bytes:
        tail = self._tail
        if self._client_sse:
            ended = not tail or tail.endswith((b"\n\n", b"\n\r\n"))
            sep = b"" if ended else b"\n" if tail.endswith(b"\n") else b"\n\n"
            return self._sent(sep + sse_error_event(message, "openai"))
        sep = b"" if not tail or tail.endswith(b"\n") else b"\n"
        return self._sent(sep + ndjson_error_line(message))

    def _mesh(self) -> dict:
        return mesh_field(self.peers, self.resumes)

    # --- relaying ---------------------------------------------------------------

    def _sent(self, out: bytes) -> bytes:
        if out:
            self._tail = (self._tail + out[-4:])[-4:]
        return out

    def _relay(self, region: bytes, units: list[bytes] | None = None) -> bytes:
        units = self._cut.units(region) if units is None else units
        if self._original:
            for unit in units:
                if self.state != COMMITTED:
                    break  # whatever follows the final object goes out as it came
                self._observe(unit)
            if self.state != COMMITTED:
                region += self._cut.take()
            return self._sent(region)
        out = []
        for unit in units:
            if self.state != COMMITTED:
                break  # a continuation's bytes after its final object are dropped
            out.append(self._rewrite(unit))
        return self._sent(b"".join(out))

    def _parse(self, unit: bytes) -> tuple[Piece, Any]:
        return parse(unit, self._cut.sse, self._upstream)

    def _note(self, obj: Any) -> None:
        """What later chunks we write must share with the upstream's."""
        if not isinstance(obj, dict):
            return
        if self._client_sse:
            if not self._templated and self._cut.sse:
                self._templated = True
                self._template.update((k, obj[k]) for k in TEMPLATE_KEYS if k in obj)
            return
        if isinstance(obj.get("created_at"), str):
            self._created_at = obj["created_at"]
        if self._original and not self._templated and isinstance(obj.get("model"), str):
            self._templated = True
            self._model = obj["model"]

    def _track(self, piece: Piece) -> None:
        if piece.text:
            self._texts.append(piece.text)
        if piece.thinking:
            self._thinks.append(piece.thinking)
        if piece.text or piece.thinking:
            self.pieces += 1
        if piece.tools:
            self.tool_calls = True
        if piece.finish:
            self._finish = piece.finish
        if piece.usage:
            self._usage_seen = True

    def _observe(self, unit: bytes) -> None:
        """Track one unit of the first upstream's stream, which goes out unchanged."""
        piece, obj = self._parse(unit)
        if piece.error is not None:
            self.state = FAILED
            return
        self._note(obj)
        self._track(piece)
        if piece.final:
            self.state = DONE_STATE

    def _rewrite(self, unit: bytes) -> bytes:
        """One unit of a continuation, as the client's stream must carry it."""
        piece, obj = self._parse(unit)
        same = self._upstream == self.path
        if piece.error is not None:
            self.state = FAILED
            return self._cut.unit_bytes(unit) if same or not self._client_sse else sse_error_event(piece.error)
        if not isinstance(obj, dict) and not piece.final:
            return self._cut.unit_bytes(unit) if same else b""
        self._note(obj)
        if same and self._client_sse:
            return self._rewrite_openai(piece, obj)
        if same:
            return self._rewrite_native(unit, piece, obj)
        if self.path == GENERATE:
            return self._chat_as_generate(piece, obj)
        return self._chat_as_completion(piece, obj)

    def _rewrite_native(self, unit: bytes, piece: Piece, obj: dict) -> bytes:
        self._track(piece)
        if piece.final:
            self.state = DONE_STATE
            out = patch_native_final(obj, self._before, self._spent_ns, self._mesh())
            if "model" in out:
                out["model"] = self._model
            return line(out)
        if obj.get("model", self._model) != self._model:
            return line({**obj, "model": self._model})
        return unit + b"\n"

    def _rewrite_openai(self, piece: Piece, obj: Any) -> bytes:
        if piece.final:
            self.state = DONE_STATE
            return SSE_DONE
        out = {**obj, **self._template}
        choices = out.get("choices")
        if self.path == V1_CHAT and self.pieces and isinstance(choices, list) and choices:
            choice = choices[0]
            if isinstance(choice, dict) and isinstance(choice.get("delta"), dict) and "role" in choice["delta"]:
                delta = {k: v for k, v in choice["delta"].items() if k != "role"}
                out["choices"] = [{**choice, "delta": delta}, *choices[1:]]
        self._track(piece)
        if piece.usage:
            out["usage"] = openai_usage(out["usage"], self._before)
            out[MESH_KEY] = self._mesh()
        elif piece.finish and not self._include_usage:
            out[MESH_KEY] = self._mesh()
        return sse(out)

    def _chat_as_generate(self, piece: Piece, obj: dict) -> bytes:
        self._track(piece)
        if piece.final:
            self.state = DONE_STATE
            final = generate_final(self._model, obj, piece)
            return line(patch_native_final(final, self._before, self._spent_ns, self._mesh()))
        if not (piece.text or piece.thinking):
            return b""
        return line(generate_chunk(self._model, obj, piece))

    def _chat_as_completion(self, piece: Piece, obj: dict) -> bytes:
        self._track(piece)
        out = []
        if piece.text:
            out.append(sse(completion_chunk(self._template, piece.text, None, self._include_usage)))
        if piece.final:
            self.state = DONE_STATE
            reason = obj.get("done_reason") if isinstance(obj.get("done_reason"), str) else ""
            finish = completion_chunk(self._template, "", reason or "stop", self._include_usage)
            if not self._include_usage:
                finish[MESH_KEY] = self._mesh()
            out.append(sse(finish))
            if self._include_usage:
                counts = {"prompt_tokens": obj.get("prompt_eval_count"), "completion_tokens": obj.get("eval_count")}
                out.append(sse(usage_chunk(self._template, openai_usage(counts, self._before), self._mesh())))
            out.append(SSE_DONE)
        return b"".join(out)
