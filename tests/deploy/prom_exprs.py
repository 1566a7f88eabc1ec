"""The PromQL the shipped Prometheus rules and Grafana dashboard run (pure helpers).

``conditions`` strips an alert expression down to what it compares: an alert
that is quiet in a healthy mesh is an empty result, which proves nothing
about its metrics; its sides with the threshold removed must return data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "meshollama.json"

# What Grafana puts in for its variables in the test: every node, peer and
# model ("All" is ".*"), and a rate window of a few 1 s scrapes.
GRAFANA_VARS = {"$__rate_interval": "20s", "$instance": ".*", "$peer": ".*", "$model": ".*"}

_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool)?")
_SET_OPS = re.compile(r"\b(and|or|unless)\b")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def rules(name: str) -> list[dict]:
    """Every rule of ``rules/<name>.yml``."""
    doc = yaml.safe_load((PROMETHEUS / "rules" / f"{name}.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression with Grafana's variables substituted) for every panel target."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], substitute(target["expr"])))
    return out


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    if "$" in expr.replace("$labels", ""):
        raise ValueError(f"a Grafana variable the test does not know in {expr!r}")
    return expr


def _top_level_split(expr: str, pattern: re.Pattern) -> list[str]:
    """Split ``expr`` at matches of ``pattern`` outside (), {}, [] and quotes."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif depth == 0:
            m = pattern.match(expr, i)
            if m and (pattern is not _SET_OPS or _word_boundary(expr, i, m.end())):
                parts.append(expr[start:i])
                start = i = m.end()
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def _word_boundary(expr: str, start: int, end: int) -> bool:
    before = expr[start - 1] if start else " "
    after = expr[end] if end < len(expr) else " "
    return not (before.isalnum() or before in "_:") and not (after.isalnum() or after in "_:")


def conditions(expr: str) -> list[str]:
    """The sides of ``expr``'s top-level comparisons (and/or/unless split
    first), numbers dropped: ``a > 0.05 and b > 1`` -> ``[a, b]``;
    ``x < scalar(y) - 1`` -> ``[x, scalar(y) - 1]``."""
    out = []
    for clause in _top_level_split(" ".join(expr.split()), _SET_OPS):
        for side in _top_level_split(clause, _COMPARISON):
            if side and not _NUMBER.match(side):
                out.append(side)
    return out
