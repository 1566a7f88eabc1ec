"""W3C Trace Context: the ``traceparent`` and ``tracestate`` headers (sans-IO).

https://www.w3.org/TR/trace-context/ . Both headers come from clients and
from peers running other code, so parsing is strict and never raises: a
header that is not exactly right is ignored (the caller then starts a new
trace), as the spec asks. What we forward is always re-formatted from the
parsed value, never the received text, so a header cannot carry anything
but the fields it is made of.

* ``traceparent``: ``version-traceid-parentid-flags``, lower-case hex.
  Version ``ff`` is invalid; version ``00`` is exactly 55 characters; a
  higher version is read by its first four fields (the spec's forward
  compatibility rule) and forwarded as ``00``. All-zero ids are invalid.
  More than one ``traceparent`` header is invalid.
* ``tracestate``: a list of ``key=value`` members, several headers joined
  with commas. It is kept only with a valid ``traceparent``; a member that
  breaks the grammar drops the whole header; at most 32 members and
  :data:`MAX_TRACESTATE` characters are kept (the spec lets a vendor cut
  members from the end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
HEADERS = frozenset({TRACEPARENT, TRACESTATE})
SAMPLED = 0x01
MAX_TRACESTATE = 512  # characters forwarded: the spec's "at least 512" for propagators
MAX_MEMBERS = 32

_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_TRACEPARENT_LATER = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.DOTALL)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# list-member = key "=" value; key = simple-key / multi-tenant-key; value: printable ASCII
# without "," and "=", not ending in a space.
_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_MEMBER = re.compile(_KEY + r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]\Z")
_OWS = " \t"


@dataclass(frozen=True)
class SpanContext:
    """Where a span sits: its trace, its own id, the flags, and the vendors' ``tracestate``."""

    trace_id: str  # 32 lower-case hex digits, not all zero
    span_id: str  # 16 lower-case hex digits, not all zero
    flags: int = SAMPLED
    state: str = ""  # tracestate, already validated and capped

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The context a ``traceparent`` value names, or None if it is not valid."""
    if value is None:
        return None
    value = value.strip(_OWS)
    m = _TRACEPARENT_00.match(value)
    if m is not None:
        trace_id, span_id, flags = m.groups()
    else:
        later = _TRACEPARENT_LATER.match(value)
        # A future version: its first fields, then only "-" and more may follow.
        if later is None or later[1] in ("00", "ff"):
            return None
        trace_id, span_id, flags = later[2], later[3], later[4]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    # Version 00 defines only the sampled bit; others are not ours to pass on.
    return SpanContext(trace_id, span_id, int(flags, 16) & SAMPLED)


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.flags & 0xFF:02x}"


def parse_tracestate(values: list[str] | tuple[str, ...]) -> str:
    """``tracestate`` header values (in order) as one checked, capped value; ``""`` if invalid."""
    members: list[str] = []
    keys: set[str] = set()
    for value in values:
        for raw in value.split(","):
            member = raw.strip(_OWS)
            if not member:
                continue  # empty list members are allowed and dropped
            if _MEMBER.match(member) is None:
                return ""
            key = member.split("=", 1)[0]
            if key in keys:  # a key twice: the header is invalid
                return ""
            keys.add(key)
            members.append(member)
    if len(members) > MAX_MEMBERS:
        return ""  # the spec: more than 32 members is invalid
    out = ",".join(members)
    while len(out) > MAX_TRACESTATE and members:
        members.pop()  # cut from the end (the oldest vendors' entries)
        out = ",".join(members)
    return out


def extract(headers) -> SpanContext | None:
    """The caller's context from request headers ((name, value) pairs, any case), or None."""
    parents: list[str] = []
    states: list[str] = []
    for k, v in headers:
        name = k.lower()
        if name == TRACEPARENT:
            parents.append(v)
        elif name == TRACESTATE:
            states.append(v)
    if len(parents) != 1:
        return None
    ctx = parse_traceparent(parents[0])
    if ctx is None or not states:
        return ctx
    state = parse_tracestate(states)
    return SpanContext(ctx.trace_id, ctx.span_id, ctx.flags, state) if state else ctx


def inject(ctx: SpanContext | None) -> tuple[tuple[str, str], ...]:
    """The headers that carry ``ctx`` to the next hop (none for no context)."""
    if ctx is None:
        return ()
    parent = ((TRACEPARENT, format_traceparent(ctx)),)
    return parent + ((TRACESTATE, ctx.state),) if ctx.state else parent


def without(headers) -> tuple[tuple[str, str], ...]:
    """``headers`` minus any trace context (lower-case names expected)."""
    return tuple((k, v) for k, v in headers if k not in HEADERS)
