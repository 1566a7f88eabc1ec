"""``meshollama run MODEL [PROMPT]``: chat with a model of the mesh in the terminal, like ``ollama run``.

Tokens are printed as they arrive (``POST /api/chat`` streamed through this
node's gateway, which routes to whichever node holds the model); the
conversation is kept and sent with every turn. Interactive: ``/bye`` or
Ctrl-D ends, Ctrl-C stops an answer (closing the stream, so the gateway cancels
the generation) and keeps the session, ``\"\"\"`` opens and closes a multi-line
message, ``/clear`` forgets the conversation. With PROMPT, or with a prompt on
standard input when it is not a terminal (both: stdin first), one answer and
exit. The node is found as for the other commands: ``--api`` (or ``--host``),
else node.json in the data dir, else the config; the key from ``--api-key`` or
``MESHOLLAMA_API_KEY``. Exit codes: 0 ok, 1 an error (printed as ``Error: ...``).

The input side (:class:`LineReader`, :class:`Conversation`) is pure and
tested without a terminal; :class:`Session` does the I/O through a ``chat``
callable, so interrupts are tested with a fake stream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

S = argparse.SUPPRESS
FENCE = '"""'
HELP = """Available commands:
  /clear          forget the conversation so far
  /bye            exit (or Ctrl-D)
  /?, /help       this help

Use \"\"\" to begin and end a multi-line message.
Ctrl-C stops an answer; Ctrl-D or /bye exits."""


def add_parser(sub, common) -> None:
    sp = sub.add_parser("run", help="chat with a model of the mesh in the terminal (like `ollama run`)")
    common(sp)
    sp.add_argument("--api", "--host", dest="api", default=S, metavar="URL",
                    help="gateway URL (default: from node.json or config)")
    sp.add_argument("--api-key", default=os.environ.get("MESHOLLAMA_API_KEY"), help=S)
    sp.add_argument("--verbose", action="store_true", help="print timings after each answer")
    sp.add_argument("model")
    sp.add_argument("prompt", nargs="*", help="one message; answer it and exit")


# -- input: pure ------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    text: str


@dataclass(frozen=True)
class Command:
    name: str  # "bye", "clear", "help", or the unknown word as typed


class LineReader:
    """Turns typed lines into :class:`Send` / :class:`Command`, or None while a
    ``\"\"\"`` message is still open (the prompt then shows ``...``)."""

    def __init__(self) -> None:
        self._open: list[str] | None = None

    @property
    def continuing(self) -> bool:
        return self._open is not None

    def cancel(self) -> None:
        self._open = None

    def feed(self, line: str) -> Send | Command | None:
        if self._open is not None:
            if line.rstrip().endswith(FENCE):
                self._open.append(line.rstrip()[: -len(FENCE)])
                text, self._open = "\n".join(self._open), None
                return Send(text.strip("\n")) if text.strip() else None
            self._open.append(line)
            return None
        stripped = line.strip()
        if stripped.startswith(FENCE):
            rest = stripped[len(FENCE):]
            if rest.endswith(FENCE) and len(rest) >= len(FENCE):  # """one line"""
                return Send(rest[: -len(FENCE)].strip()) if rest[: -len(FENCE)].strip() else None
            self._open = [rest] if rest else []
            return None
        if not stripped:
            return None
        if stripped.startswith("/"):
            word = stripped.split()[0].lower()
            return Command({"/bye": "bye", "/exit": "bye", "/clear": "clear", "/?": "help",
                            "/help": "help"}.get(word, word))
        return Send(stripped)


@dataclass
class Conversation:
    """The messages sent with every turn."""

    messages: list[dict[str, str]] = field(default_factory=list)

    def ask(self, text: str) -> list[dict[str, str]]:
        self.messages.append({"role": "user", "content": text})
        return list(self.messages)

    def answered(self, text: str) -> None:
        # An interrupted answer is kept as far as it was shown: the conversation is what the user saw.
        if text:
            self.messages.append({"role": "assistant", "content": text})

    def clear(self) -> None:
        self.messages.clear()


# -- output: errors ---------------------------------------------------------------


class RunError(Exception):
    """An error to print as ``Error: ...`` (Ollama's wording) and exit 1."""


def explain(status: int, body: str, model: str) -> str:
    """One readable line for an error answer of the gateway (Ollama's ``{"error": ...}``)."""
    try:
        data = json.loads(body)
        message = data.get("error") if isinstance(data, dict) else None
        if isinstance(message, dict):  # OpenAI-shaped
            message = message.get("message")
    except ValueError:
        message = None
    message = str(message or body.strip() or f"HTTP {status}")
    if status == 404 and "not found" in message:
        return f"{message}; no node of the mesh has it. Pull it with: meshollama pull {model}"
    if status in (401, 403):
        return f"{message} (set MESHOLLAMA_API_KEY or --api-key)"
    return message


# -- the session -------------------------------------------------------------------

Chat = Callable[[list[dict[str, str]]], Iterator[dict[str, Any]]]


class Session:
    """One conversation: read, send, print the answer as it streams."""

    def __init__(self, chat: Chat, out: TextIO, *, verbose: bool = False, err: TextIO | None = None) -> None:
        self.chat, self.out, self.verbose = chat, out, verbose
        self.err = err or sys.stderr
        self.conversation = Conversation()

    def turn(self, text: str) -> str:
        """Send ``text`` with the history, print the answer as it comes; returns it.
        KeyboardInterrupt stops it (re-raised after the partial answer is kept)."""
        shown: list[str] = []
        events = self.chat(self.conversation.ask(text))
        try:
            for event in events:
                if "error" in event:
                    raise RunError(str(event["error"]))
                piece = (event.get("message") or {}).get("content") or ""
                if piece:
                    shown.append(piece)
                    self.out.write(piece)
                    self.out.flush()
                if event.get("done"):
                    if self.verbose:
                        self._stats(event)
                    break
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # at once, not when the traceback goes: the gateway stops generating
            self.conversation.answered("".join(shown))
        return "".join(shown)

    def _stats(self, event: dict[str, Any]) -> None:
        def rate(count: Any, ns: Any) -> str:
            return f"{count / (ns / 1e9):.2f} tokens/s" if count and ns else "-"

        node = event.get("_peer")
        self.err.write(
            f"\n\ntotal duration:       {event.get('total_duration', 0) / 1e9:.3f}s\n"
            f"prompt eval count:    {event.get('prompt_eval_count', 0)} token(s)\n"
            f"eval count:           {event.get('eval_count', 0)} token(s)\n"
            f"eval rate:            {rate(event.get('eval_count'), event.get('eval_duration'))}\n"
            + (f"answered by:          {node}\n" if node else ""))
        self.err.flush()

    def one_shot(self, text: str) -> int:
        answer = self.turn(text)
        if answer and not answer.endswith("\n"):
            self.out.write("\n")
        self.out.flush()
        return 0

    def interactive(self, read: Callable[[str], str]) -> int:
        """``read(prompt)`` is ``input``: EOFError is Ctrl-D, KeyboardInterrupt is Ctrl-C."""
        reader = LineReader()
        while True:
            try:
                line = read("... " if reader.continuing else ">>> ")
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n" if not reader.continuing else "\n")
                reader.cancel()
                continue
            item = reader.feed(line)
            if item is None:
                continue
            if isinstance(item, Command):
                if item.name == "bye":
                    return 0
                if item.name == "clear":
                    self.conversation.clear()
                    self.out.write("Cleared session context\n")
                elif item.name == "help":
                    self.out.write(HELP + "\n")
                else:
                    self.out.write(f"Unknown command '{item.name}'. Type /? for help\n")
                continue
            try:
                self.turn(item.text)
            except KeyboardInterrupt:
                pass  # the answer stops, the session goes on
            except RunError as exc:
                self.out.write("\n")
                self.err.write(f"Error: {exc}\n")
                self.err.flush()
            self.out.write("\n\n")
            self.out.flush()


# -- HTTP ------------------------------------------------------------------------------


class Gateway:
    """``POST /api/chat`` (streamed) and ``POST /api/show`` on the node's gateway."""

    def __init__(self, url: str, model: str, headers: dict[str, str], verify: Any) -> None:
        self.url, self.model, self.headers, self.verify = url, model, headers, verify

    def _unreachable(self, exc: Exception) -> RunError:
        return RunError(f"cannot reach the node at {self.url}: {exc} (is `meshollama start` running?)")

    def check_model(self) -> None:
        """Fail early, as `ollama run` does, when no node of the mesh has the model."""
        import httpx

        try:
            resp = httpx.post(self.url + "/api/show", json={"model": self.model}, headers=self.headers,
                              timeout=30.0, verify=self.verify)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code != 200:
            raise RunError(explain(resp.status_code, resp.text, self.model))

    def chat(self, messages: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        import httpx

        body = {"model": self.model, "messages": messages, "stream": True}
        try:
            # The stream is closed on any exit, Ctrl-C included: the gateway then cancels the generation.
            with httpx.stream("POST", self.url + "/api/chat", json=body, headers=self.headers,
                              timeout=httpx.Timeout(30.0, read=None), verify=self.verify) as resp:
                if resp.status_code != 200:
                    raise RunError(explain(resp.status_code, resp.read().decode(errors="replace"), self.model))
                peer = resp.headers.get("x-meshollama-peer")
                for line in resp.iter_lines():
                    if line.strip():
                        event = json.loads(line)
                        if event.get("done") and peer:
                            event["_peer"] = peer
                        yield event
        except httpx.HTTPError as exc:
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise self._unreachable(exc) from None
            raise RunError(f"the answer broke off: {exc}") from None


def prompt_text(args_prompt: Iterable[str], stdin: TextIO) -> str | None:
    """The one-shot prompt: piped stdin first, then the PROMPT words; None: interactive."""
    parts = []
    if not stdin.isatty():
        piped = stdin.read()
        if piped.strip():
            parts.append(piped.rstrip("\n"))
    words = " ".join(args_prompt).strip()
    if words:
        parts.append(words)
    if parts or not stdin.isatty():
        return "\n".join(parts)
    return None


def run(args: argparse.Namespace, load, api_url, verify_for) -> int:
    config = load(args)
    url = api_url(args, config)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    gateway = Gateway(url, args.model, headers, verify_for(config))
    session = Session(gateway.chat, sys.stdout, verbose=args.verbose)
    try:
        text = prompt_text(args.prompt, sys.stdin)
        if text is not None and not text.strip():
            raise RunError("empty prompt on standard input")
        gateway.check_model()
        if text is not None:
            return session.one_shot(text)
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        return session.interactive(input)
    except RunError as exc:
        sys.stdout.flush()
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
