"""W3C trace context: traceparent/tracestate parsing and formatting (pure)."""

from __future__ import annotations

import pytest

from meshollama.tracing import SpanContext, extract, format_traceparent, inject, parse_traceparent, parse_tracestate
from meshollama.tracing.context import MAX_TRACESTATE

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


def test_valid_round_trips():
    ctx = parse_traceparent(VALID)
    assert ctx == SpanContext(TRACE, SPAN, 1)
    assert ctx.sampled
    assert format_traceparent(ctx) == VALID


def test_not_sampled_and_unknown_flags():
    assert not parse_traceparent(f"00-{TRACE}-{SPAN}-00").sampled
    # Bits other than "sampled" are not ours to pass on.
    ctx = parse_traceparent(f"00-{TRACE}-{SPAN}-ff")
    assert ctx.flags == 1 and format_traceparent(ctx).endswith("-01")
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-02").flags == 0


def test_surrounding_whitespace_is_optional_whitespace():
    assert parse_traceparent(f" \t{VALID} ") == SpanContext(TRACE, SPAN, 1)


@pytest.mark.parametrize("value", [
    None,
    "",
    VALID.upper(),  # lower-case hex only
    f"00-{TRACE.upper()}-{SPAN}-01",
    f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
    f"0-{TRACE}-{SPAN}-01",
    f"00-{TRACE[:-1]}-{SPAN}-01",
    f"00-{TRACE}-{SPAN[:-1]}-01",
    f"00-{TRACE}-{SPAN}-1",
    f"00-{TRACE}-{SPAN}-01-",  # version 00 is exactly 55 characters
    f"00-{TRACE}-{SPAN}-01-extra",
    f"00_{TRACE}_{SPAN}_01",
    f"00-{TRACE}-{SPAN}-0g",
    f"00-{TRACE}-{SPAN}-01\r\nx-injected: 1",  # never a header smuggled through
    f"00-{TRACE}-{SPAN}-01\n",
    f"00-{TRACE}x-{SPAN}-01",
    f"cc-{TRACE}-{SPAN}-01x",  # a later version still needs "-" after the flags
    f"cc-{TRACE}-{SPAN}",  # shorter than 55 characters
])
def test_invalid_traceparent(value):
    assert parse_traceparent(value) is None


def test_later_version_is_read_by_its_known_fields_and_forwarded_as_00():
    ctx = parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-the-future-holds")
    assert ctx == SpanContext(TRACE, SPAN, 1)
    assert format_traceparent(ctx) == VALID
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-00") == SpanContext(TRACE, SPAN, 0)


def test_extract_from_headers():
    assert extract([("Traceparent", VALID)]) == SpanContext(TRACE, SPAN, 1)
    assert extract([("traceparent", VALID), ("traceparent", VALID)]) is None  # two: ambiguous
    assert extract([("tracestate", "a=1")]) is None  # no parent: tracestate means nothing
    assert extract([("traceparent", "junk"), ("tracestate", "a=1")]) is None
    ctx = extract([("traceparent", VALID), ("tracestate", "a=1, b=2"), ("tracestate", "c=3")])
    assert ctx.state == "a=1,b=2,c=3"
    ctx = extract([("traceparent", VALID), ("tracestate", "bad key=1")])
    assert ctx == SpanContext(TRACE, SPAN, 1, "")  # an invalid tracestate is dropped, the parent kept


def test_inject():
    assert inject(None) == ()
    assert inject(SpanContext(TRACE, SPAN, 0)) == (("traceparent", f"00-{TRACE}-{SPAN}-00"),)
    assert inject(SpanContext(TRACE, SPAN, 1, "k=v")) == (("traceparent", VALID), ("tracestate", "k=v"))


@pytest.mark.parametrize(("values", "expected"), [
    (["congo=t61rcWkgMzE"], "congo=t61rcWkgMzE"),
    (["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    (["a=1 , , b=2"], "a=1,b=2"),  # empty members and optional whitespace
    (["tenant@vendor=x"], "tenant@vendor=x"),
    (["0tenant@v=x"], "0tenant@v=x"),
    (["Upper=1"], ""),  # keys are lower case
    (["a=1,a=2"], ""),  # a key twice
    (["a="], ""),  # a value needs one character at least
    (["a=b,c"], ""),
    (["a=x=y"], ""),
    (["a=\x01"], ""),
    (["a=1\r\nx: y"], ""),
    ([",".join(f"k{i}=v" for i in range(33))], ""),  # more than 32 members
    (["a=1", "b=2"], "a=1,b=2"),
])
def test_tracestate(values, expected):
    assert parse_tracestate(values) == expected


def test_tracestate_is_capped_from_the_end():
    members = [f"k{i}={'v' * 100}" for i in range(10)]
    state = parse_tracestate([",".join(members)])
    assert len(state) <= MAX_TRACESTATE
    assert state == ",".join(members[:len(state.split(","))])
    assert state.startswith("k0=")
