"""``meshollama run MODEL [PROMPT]``: chat with a model of the mesh in the terminal, like ``ollama run``.

Tokens are printed as they arrive (``POST /api/chat`` streamed through this
node's gateway, which routes to whichever node holds the model); the
conversation is kept and sent with every turn. Interactive: ``/bye`` or
Ctrl-D ends, Ctrl-C stops an answer (closing the stream, so the gateway cancels
the generation) and keeps the session, ``\"\"\"`` opens and closes a multi-line
message, ``/clear`` forgets the conversation. With PROMPT, one answer and exit;
standard input that is not a terminal (UTF-8) comes first in the prompt, then
the PROMPT words, as with ``ollama run``. The node is found as for the
other commands: ``--api`` (or ``--host``), else node.json in the data dir, else
the config; the key from ``--api-key`` or ``MESHOLLAMA_API_KEY``. Exit codes:
0 ok, 1 an error (printed as ``Error: ...``), 130 Ctrl-C, 141 standard output
closed by its reader (``| head``: quietly, like a process killed by SIGPIPE).

What peers send is not trusted: an answer line that is not the expected shape
is an error (never a traceback), and control characters in an answer (when
standard output is a terminal) or in an error text (always) are not written
raw, so a peer cannot drive the user's terminal with escape sequences.

The input side (:class:`LineReader`, :class:`Conversation`) is pure and
tested without a terminal; :class:`Session` does the I/O through a ``chat``
callable, so interrupts are tested with a fake stream.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from .chat_client import ENDED_EARLY, INVALID_LINE, Gateway, RunError, _number

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


# C0 controls but \t and \n, DEL, and the C1 controls (0x80-0x9f: CSI, OSC, ... on some terminals).
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    r"""``text`` without terminal control characters (``\n`` and ``\t`` kept): for tokens on a terminal."""
    return _CONTROLS.sub("", text)


def escape_controls(text: str) -> str:
    r"""``text`` with terminal control characters shown as ``\xNN`` (``\n``, ``\t`` kept): for error texts."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


# -- the session -------------------------------------------------------------------

Chat = Callable[[list[dict[str, str]]], Iterator[dict[str, Any]]]


class Session:
    """One conversation: read, send, print the answer as it streams.

    On a terminal (``out.isatty()``) the answer's control characters are dropped
    (:func:`strip_controls`); the conversation keeps the text as the model sent it."""

    def __init__(self, chat: Chat, out: TextIO, *, verbose: bool = False, err: TextIO | None = None,
                 terminal: bool | None = None) -> None:
        self.chat, self.out, self.verbose = chat, out, verbose
        self.err = err or sys.stderr
        self.terminal = _isatty(out) if terminal is None else terminal
        self.conversation = Conversation()
        self.mid_line = False  # something was written to out since its last newline

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.mid_line = not text.endswith("\n")

    def error(self, message: str) -> None:
        """``Error: ...`` on err, on a line of its own, control characters escaped."""
        if self.mid_line:
            self._write("\n")
        self.out.flush()
        self.err.write(f"Error: {escape_controls(message)}\n")
        self.err.flush()

    def turn(self, text: str) -> str:
        """Send ``text`` with the history, print the answer as it comes; returns it.
        KeyboardInterrupt stops it (re-raised after the partial answer is kept).
        An error line, an invalid line, or a stream that ends without ``done``: RunError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RunError("the message is not valid UTF-8 text") from None
        shown: list[str] = []
        events = self.chat(self.conversation.ask(text))
        try:
            for event in events:
                if not isinstance(event, dict):
                    raise RunError(INVALID_LINE)
                if "error" in event:
                    raise RunError(str(event["error"]))
                message = event.get("message")
                if message is not None and not isinstance(message, dict):
                    raise RunError(INVALID_LINE)
                piece = (message or {}).get("content") or ""
                if not isinstance(piece, str):
                    raise RunError(INVALID_LINE)
                if piece:
                    shown.append(piece)
                    self._write(strip_controls(piece) if self.terminal else piece)
                    self.out.flush()
                if event.get("done"):
                    if self.verbose:
                        self._stats(event)
                    break
            else:
                raise RunError(ENDED_EARLY)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # at once, not when the traceback goes: the gateway stops generating
            self.conversation.answered("".join(shown))
        return "".join(shown)

    def _stats(self, event: dict[str, Any]) -> None:
        def rate(count: float, ns: float) -> str:
            return f"{count / (ns / 1e9):.2f} tokens/s" if count and ns else "-"

        total, prompt = _number(event.get("total_duration")), _number(event.get("prompt_eval_count"))
        count, duration = _number(event.get("eval_count")), _number(event.get("eval_duration"))
        node = event.get("_peer")
        self.err.write(
            f"\n\ntotal duration:       {total / 1e9:.3f}s\n"
            f"prompt eval count:    {prompt:g} token(s)\n"
            f"eval count:           {count:g} token(s)\n"
            f"eval rate:            {rate(count, duration)}\n"
            + (f"answered by:          {escape_controls(str(node))}\n" if node else ""))
        self.err.flush()

    def one_shot(self, text: str) -> int:
        self.turn(text)
        if self.mid_line:
            self._write("\n")
        self.out.flush()
        return 0

    def interactive(self, read: Callable[[str], str]) -> int:
        """``read(prompt)`` is ``input``: EOFError is Ctrl-D, KeyboardInterrupt is Ctrl-C."""
        reader = LineReader()
        while True:
            self.mid_line = False  # input() echoed the user's newline
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
                    self.out.write(f"Unknown command '{escape_controls(item.name)}'. Type /? for help\n")
                continue
            try:
                self.turn(item.text)
            except KeyboardInterrupt:
                pass  # the answer stops, the session goes on
            except RunError as exc:
                self.error(str(exc))
            self.out.write("\n" if self.mid_line else "")
            self.out.write("\n")
            self.out.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def prompt_text(args_prompt: Iterable[str], stdin: TextIO) -> str | None:
    """The one-shot prompt, as ``ollama run`` builds it: all of stdin when it is not a
    terminal, then the PROMPT words, joined by a space (``cat notes | meshollama run m
    summarise:``); None: interactive. Like ollama, a stdin that never ends (ssh without
    -t) is waited for: give it ``</dev/null``. Stdin that is not UTF-8 is a RunError."""
    words = " ".join(args_prompt).strip()
    if _isatty(stdin):
        return words or None
    raw = getattr(stdin, "buffer", None)
    try:
        piped = raw.read().decode("utf-8") if raw is not None else stdin.read()
    except UnicodeDecodeError:
        raise RunError("standard input is not UTF-8 text") from None
    piped = piped.rstrip("\n")
    return " ".join(part for part in (piped, words) if part)


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
        session.error(str(exc))
        return 1
    except BrokenPipeError:
        # The reader went away (`| head -c 10`): stop quietly, as a process killed by SIGPIPE
        # does (Ollama). Standard output goes to /dev/null so that the interpreter's final
        # flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)
        return 141
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
