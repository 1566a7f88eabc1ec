"""``meshollama run`` as a user runs it: a subprocess against a real node.

The node is a real ``meshollama start`` (loopback, OS-chosen ports) with a
stand-in Ollama (tests/fakes/fake_ollama.py) as its backend; the command is
the installed console script, found through node.json exactly as a user's
would be (``--data-dir``), or through ``--host``. The interactive session runs
on a pseudo-terminal, so readline, the prompt and Ctrl-C are the terminal's.
One test uses the real embedded SmolLM2 model. What a misbehaving node or
peer could send (malformed lines, escape sequences, a stream cut short) comes
from a scripted stand-in gateway (:func:`fake_gateway`).
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import pty
import subprocess
import sys
import termios
import threading
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from meshollama.backends.embedded import available, default_model_path
from tests.fakes.fake_ollama import serve_fake

from .cluster import cluster

pytestmark = pytest.mark.slow

MESHOLLAMA = str(Path(sys.executable).with_name("meshollama"))
MODEL = "llama3:latest"


@asynccontextmanager
async def node_with_fake(tmp_path, **fake_kw):
    async with trio.open_nursery() as fn, cluster(tmp_path) as c:
        fake = await fn.start(partial(serve_fake, [MODEL], name="F", **fake_kw))
        node = await c.start("n", "--backend", "ollama", "--ollama-url", fake.url)

        async def listed():
            r = await c.client.get(node.api + "/api/tags")
            return any(m["name"] == MODEL for m in r.json()["models"])

        await c.wait_until(listed)
        try:
            yield node, fake
        finally:
            fn.cancel_scope.cancel()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHOLLAMA_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


async def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return await trio.run_process([MESHOLLAMA, "run", *args], stdin=stdin if stdin is not None else b"",
                                  capture_stdout=True, capture_stderr=True, check=False, env=_env())


async def test_one_shot_prompt_found_through_node_json(tmp_path):
    with trio.fail_after(60):
        async with node_with_fake(tmp_path) as (node, fake):
            r = await run_cli("--data-dir", str(node.data_dir), "llama3", "why", "is", "the", "sky", "blue?")
            out = r.stdout.decode()
            assert r.returncode == 0, r.stderr.decode()
            assert out.startswith("hello from F") and out.endswith("\n"), out
            chats = [q for q in fake.requests if q.path == "/api/chat"]
            assert chats[-1].json()["messages"] == [{"role": "user", "content": "why is the sky blue?"}]
            assert chats[-1].json()["stream"] is True


async def test_piped_stdin_is_the_prompt(tmp_path):
    with trio.fail_after(60):
        async with node_with_fake(tmp_path) as (node, fake):
            r = await run_cli("--host", node.api, MODEL, stdin=b"line one\nline two\n")
            assert r.returncode == 0, r.stderr.decode()
            assert "hello from F" in r.stdout.decode()
            sent = [q for q in fake.requests if q.path == "/api/chat"][-1].json()["messages"]
            assert sent == [{"role": "user", "content": "line one\nline two"}]


async def test_missing_model_says_pull_and_exits_1(tmp_path):
    with trio.fail_after(60):
        async with node_with_fake(tmp_path) as (node, _):
            r = await run_cli("--host", node.api, "nope", "hi")
            err = r.stderr.decode()
            assert r.returncode == 1
            assert err.startswith("Error: model 'nope") and "not found" in err and "meshollama pull nope" in err, err
            assert r.stdout == b""


async def test_no_node_is_a_clear_error(tmp_path):
    with trio.fail_after(30):
        r = await run_cli("--host", "http://127.0.0.1:9", MODEL, "hi")  # discard port: nothing listens
        assert r.returncode == 1
        assert "cannot reach the node at http://127.0.0.1:9" in r.stderr.decode()


class Terminal:
    """A child on a pseudo-terminal: what it printed so far, and typing into it."""

    def __init__(self, fd: int, proc: trio.Process) -> None:
        self.fd, self.proc, self.seen = fd, proc, ""

    async def expect(self, text: str, *, after: int = 0) -> int:
        """Wait until ``text`` was printed after offset ``after``; returns the offset past it."""
        while (found := self.seen.find(text, after)) < 0:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                raise AssertionError(f"{text!r} never came; the terminal showed:\n{self.seen}") from None
            self.seen += data.decode(errors="replace").replace("\r\n", "\n")
        return found + len(text)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())


def _own_terminal() -> None:
    """In the child: a session of its own with the pty as controlling terminal, so
    that Ctrl-C typed into it is a SIGINT to the child, as in a real terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@asynccontextmanager
async def terminal(*args: str):
    master, slave = pty.openpty()
    proc = await trio.lowlevel.open_process([MESHOLLAMA, "run", *args], stdin=slave, stdout=slave,
                                            stderr=slave, env={**_env(), "TERM": "dumb"}, preexec_fn=_own_terminal)
    os.close(slave)
    os.set_blocking(master, False)
    try:
        yield Terminal(master, proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
        os.close(master)


async def test_interactive_session_on_a_terminal(tmp_path):
    """Two turns with history, Ctrl-C stops a slow answer but not the session,
    a \"\"\" message, /clear, and /bye exits 0."""
    with trio.fail_after(90):
        async with node_with_fake(tmp_path, tokens=6) as (node, fake), terminal("--host", node.api, MODEL) as t:
            at = await t.expect(">>> ")
            t.type("first question\n")
            at = await t.expect("hello from F", after=at)
            at = await t.expect(">>> ", after=at)
            t.type("second\n")
            at = await t.expect(">>> ", after=at)
            chats = [q.json()["messages"] for q in fake.requests if q.path == "/api/chat"]
            assert [m["role"] for m in chats[-1]] == ["user", "assistant", "user"]
            assert chats[-1][1]["content"].startswith("hello from F")

            fake.set(token_delay=2.0, tokens=50)  # a slow answer to interrupt
            t.type("tell me a long story\n")
            await fake.wait_for(lambda: any(q.path == "/api/chat" and q.outcome == "pending" for q in fake.requests))
            at = await t.expect("hello", after=at)  # the first token is on screen
            t.type("\x03")  # Ctrl-C, as the terminal sends it
            at = await t.expect(">>> ", after=at)
            # the stream was closed: the gateway cancelled the generation on the stand-in
            await fake.wait_for(lambda: fake.aborted >= 1)
            assert t.proc.returncode is None, "Ctrl-C during an answer must not end the session"

            fake.set(token_delay=0.01, tokens=3)
            t.type('"""line one\nline two"""\n')
            at = await t.expect(">>> ", after=at)
            chats = [q.json()["messages"] for q in fake.requests if q.path == "/api/chat"]
            assert chats[-1][-1] == {"role": "user", "content": "line one\nline two"}
            t.type("/clear\n")
            at = await t.expect("Cleared session context", after=at)
            at = await t.expect(">>> ", after=at)
            t.type("fresh\n")
            at = await t.expect("hello from F", after=at)
            at = await t.expect(">>> ", after=at)
            chats = [q.json()["messages"] for q in fake.requests if q.path == "/api/chat"]
            assert chats[-1] == [{"role": "user", "content": "fresh"}]
            t.type("/bye\n")
            assert await t.proc.wait() == 0


async def test_ctrl_d_exits_0(tmp_path):
    with trio.fail_after(60):
        async with node_with_fake(tmp_path) as (node, _), terminal("--host", node.api, MODEL) as t:
            await t.expect(">>> ")
            t.type("\x04")
            assert await t.proc.wait() == 0


@pytest.mark.embedded
@pytest.mark.skipif(not available() or default_model_path() is None,
                    reason="llama-cpp-python or the SmolLM2 model is not installed (run make install)")
async def test_real_embedded_model_answers(tmp_path):
    with trio.fail_after(240):
        async with cluster(tmp_path) as c:
            node = await c.start("e", "--backend", "embedded")
            r = await run_cli("--data-dir", str(node.data_dir), "--verbose", "smollm2:135m",
                              "What colour is the sky? One word.")
            assert r.returncode == 0, r.stderr.decode()
            assert r.stdout.decode().strip(), "the model said nothing"
            err = r.stderr.decode()
            assert "eval rate:" in err and "answered by:" in err, err



# -- a stand-in gateway that answers what a test scripts ---------------------------------------


@contextmanager
def fake_gateway(lines: list[bytes]):
    """A gateway on 127.0.0.1 whose ``/api/show`` says yes and whose ``/api/chat`` streams
    ``lines`` (chunked NDJSON), whatever they are. Yields its URL and the chat bodies."""
    bodies: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path == "/api/show":
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            bodies.append(json.loads(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-ndjson")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                for line in lines:
                    data = line + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client went away (| head)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def line(**event) -> bytes:
    return json.dumps(event).encode()


HELLO = [line(message={"role": "assistant", "content": "hello"}, done=False), line(done=True)]


@pytest.mark.parametrize("lines, verbose", [
    ([line(message={"content": "hi "}), b"<html>oops</html>"], False),
    ([b"[1,2]"], False),
    ([b'{"message":"hello"}'], False),
    ([b'{"message":{"content":5}}'], False),
    ([b"[" * 200_000 + b"]" * 200_000], False),  # too deep for json: RecursionError
    ([line(message={"content": "x"}), line(done=True, eval_count="many", eval_duration=1)], True),
], ids=["not-json", "a-list", "message-a-string", "content-a-number", "deep", "stats-not-numbers"])
async def test_invalid_answer_lines_are_an_error_not_a_traceback(lines, verbose):
    with trio.fail_after(30), fake_gateway(lines) as (url, _):
        r = await run_cli(*(["--verbose"] if verbose else []), "--host", url, MODEL, "hi")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.endswith("Error: the node sent an invalid answer line\n") and "Traceback" not in err, err
    out = r.stdout.decode()
    assert out == "" or out.endswith("\n"), out  # Error: starts a line of its own


async def test_an_answer_without_done_ended_early():
    with trio.fail_after(30), fake_gateway([line(message={"content": "partial answer"})]) as (url, _):
        r = await run_cli("--host", url, MODEL, "hi")
    assert r.returncode == 1
    assert r.stdout.decode() == "partial answer\n"
    assert r.stderr.decode() == "Error: the answer ended early\n"


async def test_a_closed_pipe_ends_quietly():
    """``meshollama run m q | head -c 10``: no BrokenPipeError traceback, the status of a SIGPIPE."""
    lines = [line(message={"content": "line\n"})] * 20_000 + [line(done=True)]
    with trio.fail_after(60), fake_gateway(lines) as (url, _):
        proc = await trio.lowlevel.open_process([MESHOLLAMA, "run", "--host", url, MODEL, "hi"],
                                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=_env())
        got = b""
        while len(got) < 10:
            got += await proc.stdout.receive_some(10 - len(got))
        await proc.stdout.aclose()  # head has what it wanted
        err = b""
        while chunk := await proc.stderr.receive_some():
            err += chunk
        rc = await proc.wait()
    assert got == b"line\nline\n"
    assert err == b"", err.decode()
    assert rc == 141


async def test_error_texts_from_peers_are_escaped():
    lines = [line(message={"content": "a"}), line(error="\x1b]0;PWNED\x07\x1b[2Jboom")]
    with trio.fail_after(30), fake_gateway(lines) as (url, _):
        r = await run_cli("--host", url, MODEL, "hi")
    assert r.returncode == 1
    assert r.stdout == b"a\n"
    assert r.stderr == b"Error: \\x1b]0;PWNED\\x07\\x1b[2Jboom\n"


async def test_escape_sequences_do_not_reach_a_terminal():
    evil = "safe \x1b]0;PWNED\x07\x1b[2J\x1b[31mred\x1b[0m \x1b]52;c;ZWNobyBwd25lZA==\x07\x9b2J end"
    with trio.fail_after(30), fake_gateway([line(message={"content": evil}), line(done=True)]) as (url, _):
        async with terminal("--host", url, MODEL, "hi") as t:
            await t.expect(" end")
            assert await t.proc.wait() == 0
    shown = t.seen
    assert "safe ]0;PWNED[2J[31mred[0m ]52;c;ZWNobyBwd25lZA==2J end" in shown, repr(shown)
    assert not any(c in shown for c in "\x1b\x07\x9b"), repr(shown)


async def test_proxy_variables_do_not_divert_the_local_node():
    """A dead HTTP(S)_PROXY in the environment: the node on loopback is still reached directly."""
    dead = "http://127.0.0.1:9"
    proxies = {name: dead for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                                       "ALL_PROXY")}
    with trio.fail_after(30), fake_gateway(HELLO) as (url, bodies):
        for host in (url, url.replace("127.0.0.1", "localhost")):
            r = await trio.run_process([MESHOLLAMA, "run", "--host", host, MODEL, "hi"], stdin=b"",
                                       capture_stdout=True, capture_stderr=True, check=False,
                                       env={**_env(), **proxies})
            assert r.returncode == 0, r.stderr.decode()
            assert r.stdout == b"hello\n"
    assert len(bodies) == 2


async def test_piped_stdin_and_prompt_words_make_one_prompt_as_with_ollama():
    """``cat notes | meshollama run m summarise:``: stdin first, then the words."""
    with trio.fail_after(30), fake_gateway(HELLO) as (url, bodies):
        r = await trio.run_process([MESHOLLAMA, "run", "--host", url, MODEL, "summarise:"], stdin=b"my notes\n",
                                   capture_stdout=True, capture_stderr=True, check=False, env=_env())
    assert r.returncode == 0, r.stderr.decode()
    assert bodies[0]["messages"] == [{"role": "user", "content": "my notes summarise:"}]


async def test_undecodable_stdin_is_an_error():
    with trio.fail_after(30), fake_gateway(HELLO) as (url, bodies):
        r = await run_cli("--host", url, MODEL, stdin=b"\xff\xfe not text\n")
    assert r.returncode == 1
    assert r.stderr.decode() == "Error: standard input is not UTF-8 text\n"
    assert not bodies
