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
import ipaddress
import json
import os
import re
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


INVALID_LINE = "the node sent an invalid answer line"
ENDED_EARLY = "the answer ended early"

# C0 controls but \t and \n, DEL, and the C1 controls (0x80-0x9f: CSI, OSC, ... on some terminals).
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    r"""``text`` without terminal control characters (``\n`` and ``\t`` kept): for tokens on a terminal."""
    return _CONTROLS.sub("", text)


def escape_controls(text: str) -> str:
    r"""``text`` with terminal control characters shown as ``\xNN`` (``\n``, ``\t`` kept): for error texts."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def parse_line(line: str | bytes) -> dict[str, Any]:
    """One line of the streamed answer, checked for the shape :meth:`Session.turn` reads:
    a JSON object; ``message`` absent, null or an object whose ``content`` is absent,
    null or a string. Anything else (or JSON nested too deep to parse) is a RunError."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        raise RunError(INVALID_LINE) from None
    if not isinstance(event, dict):
        raise RunError(INVALID_LINE)
    message = event.get("message")
    if message is not None and not (isinstance(message, dict)
                                    and isinstance(message.get("content"), (str, type(None)))):
        raise RunError(INVALID_LINE)
    return event


def _number(value: Any) -> float:
    """A timing or count of the final line (absent: 0); not a number: the line is invalid."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(INVALID_LINE)
    return value


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


# -- HTTP ------------------------------------------------------------------------------


class Gateway:
    """``POST /api/chat`` (streamed) and ``POST /api/show`` on the node's gateway."""

    def __init__(self, url: str, model: str, headers: dict[str, str], verify: Any) -> None:
        self.url, self.model, self.headers, self.verify = url, model, headers, verify
        # HTTP(S)_PROXY, ALL_PROXY: not for this machine's own node. A proxy cannot reach
        # the caller's loopback (a dead or remote proxy would turn every run into an error),
        # and Ollama's Go client skips the proxy for loopback hosts too. A node on another
        # machine (--host) may need the proxy the environment names, so it keeps them.
        self.trust_env = not is_loopback_url(url)

    def _unreachable(self, exc: Exception) -> RunError:
        return RunError(f"cannot reach the node at {self.url}: {exc} (is `meshollama start` running?)")

    def check_model(self) -> None:
        """Fail early, as `ollama run` does, when no node of the mesh has the model."""
        import httpx

        try:
            resp = httpx.post(self.url + "/api/show", json={"model": self.model}, headers=self.headers,
                              timeout=30.0, verify=self.verify, trust_env=self.trust_env)
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
                              timeout=httpx.Timeout(30.0, read=None), verify=self.verify,
                              trust_env=self.trust_env) as resp:
                if resp.status_code != 200:
                    raise RunError(explain(resp.status_code, resp.read().decode(errors="replace"), self.model))
                peer = resp.headers.get("x-meshollama-peer")
                for line in resp.iter_lines():
                    if line.strip():
                        event = parse_line(line)
                        if event.get("done") and peer:
                            event["_peer"] = peer
                        yield event
        except httpx.HTTPError as exc:
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise self._unreachable(exc) from None
            raise RunError(f"the answer broke off: {exc}") from None


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine: localhost, a loopback or an unspecified address."""
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified


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
