"""``meshollama run``'s pure parts: typed lines, the history, interrupts, error wording."""

from __future__ import annotations

import io

import pytest

from meshollama.cli import _parser
from meshollama.cli_run import Command, LineReader, RunError, Send, Session, explain, prompt_text


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


@pytest.mark.parametrize("words, stdin, expected", [
    (["why", "blue?"], Stdin(tty=True), "why blue?"),
    ([], Stdin(tty=True), None),  # interactive
    ([], Stdin("piped text\n"), "piped text"),
    (["summarise:"], Stdin("a long\ndocument\n"), "a long\ndocument\nsummarise:"),
    ([], Stdin(""), ""),  # empty pipe: an error for the caller
])
def test_prompt_text(words, stdin, expected):
    assert prompt_text(words, stdin) == expected


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
