"""``meshollama run``'s pure parts: typed lines, the history, interrupts, error wording."""

from __future__ import annotations

import io

import pytest

from meshollama.cli import _parser
from meshollama.chat_client import RunError, explain, is_loopback_url, parse_line
from meshollama.cli_run import (
    Command,
    LineReader,
    Send,
    Session,
    escape_controls,
    prompt_text,
    strip_controls,
)


def feed_all(lines):
    reader = LineReader()
    return [reader.feed(line) for line in lines], reader


@pytest.mark.parametrize("line, expected", [
    ("hello", Send("hello")),
    ("  spaced out  ", Send("spaced out")),
    ("", None),
    ("   ", None),
    ("/bye", Command("bye")),
    ("/exit", Command("bye")),
    ("/BYE", Command("bye")),
    ("/clear", Command("clear")),
    ("/?", Command("help")),
    ("/help", Command("help")),
    ("/set verbose", Command("/set")),
    ('"""one line"""', Send("one line")),
    ('""""""', None),
])
def test_single_lines(line, expected):
    assert LineReader().feed(line) == expected


def test_triple_quotes_gather_lines_until_closed():
    out, reader = feed_all(['"""first', "second", "", "/bye is text here", 'last"""'])
    assert out[:4] == [None, None, None, None]
    assert out[4] == Send("first\nsecond\n\n/bye is text here\nlast")
    assert not reader.continuing


def test_triple_quotes_alone_on_their_lines():
    out, _ = feed_all(['"""', "a", "b", '"""'])
    assert out[-1] == Send("a\nb")


def test_cancel_drops_an_open_message():
    reader = LineReader()
    reader.feed('"""draft')
    assert reader.continuing
    reader.cancel()
    assert not reader.continuing and reader.feed("hi") == Send("hi")


def chunks(*pieces, done=True, **final):
    for p in pieces:
        yield {"message": {"role": "assistant", "content": p}, "done": False}
    if done:
        yield {"message": {"role": "assistant", "content": ""}, "done": True, **final}


class FakeChat:
    """Records the messages of every turn; answers from a script of event lists."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.sent = []
        self.closed = 0

    def __call__(self, messages):
        self.sent.append([dict(m) for m in messages])
        answer = self.answers.pop(0)
        return self._events(answer)

    def _events(self, answer):
        try:
            for item in answer:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed += 1


def scripted(lines):
    """``input`` replacement: each item is a line, or an exception to raise."""
    items = list(lines)

    def read(prompt):
        if not items:
            raise EOFError
        item = items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_history_is_sent_with_every_turn_and_cleared():
    chat = FakeChat(chunks("Hi", " there"), chunks("Paris"), chunks("fresh"))
    out = io.StringIO()
    rc = Session(chat, out).interactive(scripted(["hello", "capital of France?", "/clear", "again", "/bye"]))
    assert rc == 0
    assert chat.sent[0] == [{"role": "user", "content": "hello"}]
    assert chat.sent[1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there"},
                            {"role": "user", "content": "capital of France?"}]
    assert chat.sent[2] == [{"role": "user", "content": "again"}]
    text = out.getvalue()
    assert "Hi there" in text and "Paris" in text and "Cleared session context" in text


def test_ctrl_c_stops_an_answer_and_the_session_goes_on():
    chat = FakeChat([*chunks("one", " two", done=False), KeyboardInterrupt()], chunks("next"))
    out = io.StringIO()
    rc = Session(chat, out).interactive(scripted(["count", "go on"]))
    assert rc == 0  # ended by EOF (Ctrl-D), not by the Ctrl-C
    assert chat.closed == 2  # the interrupted stream was closed at once
    # what was shown is kept, so the model knows what it said
    assert chat.sent[1][1] == {"role": "assistant", "content": "one two"}
    assert "one two" in out.getvalue() and "next" in out.getvalue()


def test_ctrl_c_at_the_prompt_does_not_exit():
    chat = FakeChat(chunks("ok"))
    out = io.StringIO()
    rc = Session(chat, out).interactive(scripted([KeyboardInterrupt(), "hi", EOFError()]))
    assert rc == 0 and "Use Ctrl + d or /bye to exit." in out.getvalue()
    assert len(chat.sent) == 1


def test_ctrl_c_inside_triple_quotes_drops_the_draft():
    chat = FakeChat(chunks("ok"))
    Session(chat, io.StringIO()).interactive(scripted(['"""draft', KeyboardInterrupt(), "real", "/bye"]))
    assert chat.sent == [[{"role": "user", "content": "real"}]]


def test_an_error_mid_stream_is_printed_and_the_session_goes_on():
    chat = FakeChat([*chunks("par", done=False), {"error": "peer went away"}], chunks("fine"))
    out, err = io.StringIO(), io.StringIO()
    Session(chat, out, err=err).interactive(scripted(["a", "b"]))
    assert "Error: peer went away" in err.getvalue()
    assert "fine" in out.getvalue()


def test_one_shot_raises_on_an_error_line():
    chat = FakeChat([{"error": "boom"}])
    with pytest.raises(RunError, match="boom"):
        Session(chat, io.StringIO()).one_shot("x")


def test_unknown_command_and_help():
    out = io.StringIO()
    Session(FakeChat(), out).interactive(scripted(["/nope", "/?"]))
    assert "Unknown command '/nope'" in out.getvalue() and "/clear" in out.getvalue()


def test_verbose_prints_rates():
    err = io.StringIO()
    chat = FakeChat(chunks("x", eval_count=10, eval_duration=2_000_000_000, total_duration=3_000_000_000))
    Session(chat, io.StringIO(), verbose=True, err=err).one_shot("q")
    assert "eval rate:            5.00 tokens/s" in err.getvalue()


class Stdin(io.StringIO):
    def __init__(self, text="", tty=False):
        super().__init__(text)
        self.tty = tty

    def isatty(self):
        return self.tty

    def read(self, *a):
        if self.tty:
            raise AssertionError("a terminal must not be read for a one-shot prompt")
        return super().read(*a)


class RawStdin:
    """A non-terminal stdin with bytes underneath, as sys.stdin is."""

    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

    def isatty(self):
        return False


@pytest.mark.parametrize("words, stdin, expected", [
    (["why", "blue?"], Stdin(tty=True), "why blue?"),
    ([], Stdin(tty=True), None),  # interactive
    ([], Stdin("piped text\n"), "piped text"),
    ([], Stdin("a long\ndocument\n"), "a long\ndocument"),
    (["summarise:"], Stdin("a document\n"), "a document summarise:"),  # ollama run: stdin, then the words
    (["hi"], Stdin(""), "hi"),
    ([], Stdin(""), ""),  # empty pipe: an error for the caller
    ([], RawStdin("caf\u00e9\n".encode()), "caf\u00e9"),
])
def test_prompt_text(words, stdin, expected):
    assert prompt_text(words, stdin) == expected


def test_undecodable_stdin_is_an_error_not_a_traceback():
    with pytest.raises(RunError, match="standard input is not UTF-8"):
        prompt_text([], RawStdin(b"\xff\xfe bad"))


# -- what peers send is not trusted ---------------------------------------------------------


@pytest.mark.parametrize("line", [
    "<html>oops</html>", "[1,2]", '"text"', "5", "null", '{"message":"hello"}', '{"message":{"content":5}}',
    '{"message":[1]}', "[" * 100_000 + "]" * 100_000, '{"message":' * 50_000 + "1" + "}" * 50_000,
])
def test_invalid_answer_lines(line):
    with pytest.raises(RunError, match="the node sent an invalid answer line"):
        parse_line(line)


def test_valid_answer_lines():
    assert parse_line('{"message":{"role":"assistant","content":"hi"},"done":false}')["message"]["content"] == "hi"
    assert parse_line('{"done":true,"eval_count":3}')["done"] is True
    assert parse_line('{"message":{"content":null}}')


@pytest.mark.parametrize("events", [
    [["not", "a", "dict"]],
    [{"message": "hello"}],
    [{"message": {"content": 5}}],
])
def test_a_session_refuses_malformed_events(events):
    with pytest.raises(RunError, match="invalid answer line"):
        Session(FakeChat(events), io.StringIO()).one_shot("x")


@pytest.mark.parametrize("stats", [{"eval_count": "ten", "eval_duration": 1}, {"total_duration": [1]},
                                   {"prompt_eval_count": {"a": 1}}, {"eval_duration": True, "eval_count": 1}])
def test_non_numeric_stats_under_verbose(stats):
    with pytest.raises(RunError, match="invalid answer line"):
        Session(FakeChat(chunks("x", **stats)), io.StringIO(), verbose=True, err=io.StringIO()).one_shot("q")


def test_a_stream_without_done_ended_early():
    out = io.StringIO()
    session = Session(FakeChat(chunks("partial", done=False)), out)
    with pytest.raises(RunError, match="the answer ended early"):
        session.one_shot("q")
    assert out.getvalue() == "partial" and session.mid_line
    err = io.StringIO()
    session.err = err
    session.error("the answer ended early")
    assert out.getvalue() == "partial\n"  # Error: starts a line of its own
    assert err.getvalue() == "Error: the answer ended early\n"


def test_interactive_reports_an_early_end_and_goes_on():
    chat = FakeChat(chunks("half", done=False), chunks("fine"))
    out, err = io.StringIO(), io.StringIO()
    assert Session(chat, out, err=err).interactive(scripted(["a", "b"])) == 0
    assert "Error: the answer ended early" in err.getvalue() and "fine" in out.getvalue()


EVIL = "safe \x1b]0;PWNED\x07\x1b[2J\x1b[31mred\x1b[0m \x9b2J\x7f\r\x00 ok\n\tend"


def test_controls_are_dropped_on_a_terminal_only():
    tty, pipe = io.StringIO(), io.StringIO()
    chat = FakeChat(chunks(EVIL), chunks(EVIL))
    Session(chat, tty, terminal=True).one_shot("q")
    assert tty.getvalue() == "safe ]0;PWNED[2J[31mred[0m 2J ok\n\tend\n"
    session = Session(chat, pipe, terminal=False)
    session.one_shot("q")
    assert pipe.getvalue() == EVIL + "\n"  # a pipe or file gets the answer as sent
    assert session.conversation.messages[-1]["content"] == EVIL  # and the model's context is untouched


def test_error_texts_are_escaped_always():
    err = io.StringIO()
    chat = FakeChat([*chunks("a", done=False), {"error": "\x1b[2Jboom\x07\x9b"}])
    Session(chat, io.StringIO(), err=err, terminal=False).interactive(scripted(["x"]))
    assert "Error: \\x1b[2Jboom\\x07\\x9b\n" in err.getvalue()
    assert "\x1b" not in err.getvalue()


def test_control_helpers():
    assert strip_controls("a\x1bb\x85c\td\ne\x7f") == "abc\td\ne"
    assert escape_controls("\x1b[1m\x00") == "\\x1b[1m\\x00"
    assert strip_controls("caf\u00e9 \u4e16\u754c") == "caf\u00e9 \u4e16\u754c"  # printable text untouched


@pytest.mark.parametrize("url, loopback", [
    ("http://127.0.0.1:11434", True), ("http://127.1.2.3:1", True), ("http://localhost:11434", True),
    ("http://[::1]:11434", True), ("http://0.0.0.0:11434", True), ("https://LOCALHOST.:1", True),
    ("http://[::ffff:127.0.0.1]:1", True), ("http://node1:11434", False), ("http://192.168.1.5:11434", False),
    ("http://localhost.example.com", False),
])
def test_loopback_urls_bypass_proxies(url, loopback):
    assert is_loopback_url(url) is loopback


@pytest.mark.parametrize("status, body, expect", [
    (404, '{"error":"model \'nope\' not found"}', "model 'nope' not found; no node of the mesh has it. "
                                                   "Pull it with: meshollama pull nope"),
    (401, '{"error":"unauthorized"}', "unauthorized (set MESHOLLAMA_API_KEY or --api-key)"),
    (503, '{"error":{"message":"busy","type":"x"}}', "busy"),
    (500, "plain text", "plain text"),
    (502, "", "HTTP 502"),
])
def test_errors_read_like_ollama(status, body, expect):
    assert explain(status, body, "nope") == expect


def test_parser_takes_model_prompt_and_host():
    args = _parser().parse_args(["run", "--host", "http://h:1", "llama3", "why", "is", "it"])
    assert (args.command, args.api, args.model, args.prompt) == ("run", "http://h:1", "llama3", ["why", "is", "it"])
    args = _parser().parse_args(["run", "llama3"])
    assert args.prompt == [] and not hasattr(args, "api")
