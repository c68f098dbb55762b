"""The runtime API every backend implements: generate (greedy, sampling, beams, stops, streaming), logits, score.

A backend supplies four small hooks: ``_prefill(ids)`` and ``_step(token)`` (next-token logits with a KV cache),
``logits(ids)`` (all positions, for perplexity and KLD) and ``_close()``. Sampling, stop handling, streaming and
timing live here once, so a GenerationConfig means the same thing on every backend.

With ``keep_cache`` on (``edgelm chat``, ``edgelm serve``), a prompt that shares its start with the tokens already
in the KV cache prefills only the rest: two more hooks, ``_rewind(n)`` (keep the first n cached tokens) and
``_extend(ids)`` (run ids after them), on the backends whose cache can do it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

from edgelm.errors import EdgelmError
from edgelm.runtimes.sampling import GenerationConfig, next_token
from edgelm.runtimes.text import StopMatcher, StreamDecoder, TextTokenizer

if TYPE_CHECKING:
    import numpy as np

    from edgelm.metrics import LMScore

log = logging.getLogger(__name__)



def physical_cores() -> int:
    """Physical cores (hyperthreads don't help matmul-bound decode)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def default_threads(model_bytes: int) -> tuple[int, str]:
    """(threads, reason): all physical cores. Measured on 2 idle cores (docs/results.md, runtimes): llama.cpp and
    ONNX Runtime decode faster on 2 threads than on 1 at every size tried (5 to 272 MiB); PyTorch decodes as fast on
    either and prefills faster on 2. On a loaded machine, fewer threads can win: pass them explicitly."""
    cores = physical_cores()
    return cores, f"all {cores} physical cores" if cores > 1 else "1 physical core"


def check_threads(threads: int | None) -> None:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise EdgelmError(f"threads must be a whole number >= 1, got {threads!r}")


@dataclass
class Generation:
    """One finished generation, with the timings bench uses."""

    text: str  # generated text (stop string excluded)
    ids: list[int]  # generated token ids (stop token excluded)
    prompt_tokens: int  # tokens in the prompt
    finish_reason: str  # "stop" (stop id or string) or "length"
    prefill_s: float = 0.0  # prompt in -> first logits out
    ttft_s: float = 0.0  # call -> first token chosen (includes tokenizing and prefill)
    decode_s: float = 0.0  # first token -> last token
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the previous call's cache (keep_cache)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        from edgelm.metrics import tokens_per_second

        return tokens_per_second(max(len(self.ids) - 1, 0), self.decode_s)


@dataclass
class Draft:
    """A runtime's first greedy tokens and how sure it was of each (see Runtime.draft)."""

    ids: list[int]  # greedy token ids
    entropy: list[float]  # nats, of the next-token distribution at each step
    logprob: list[float]  # of each chosen token
    top_logprobs: list[list[float]] = field(default_factory=list)  # the n largest log-probs at each step, if asked

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy) if self.entropy else 0.0


class Stream:
    """Iterate for text deltas; ``result`` holds the final object (a Generation, or the ``result_type`` given) once
    the iteration ends. The underlying iterator yields str deltas, then that object."""

    result_type: type = Generation

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self.result: Any = None

    def __iter__(self) -> Iterator[str]:
        try:
            for item in self._it:
                if isinstance(item, self.result_type):
                    self.result = item
                elif item:
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop early: what the generation holds (a device lock, a queue slot, a KV cache) is released now, not when
        the stream is garbage-collected. Call it from the thread that iterates."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class Runtime:
    """Base class of the backends registered in ``edgelm.registry.RUNTIMES``."""

    name: ClassVar[str] = ""  # registry name, e.g. "llamacpp"
    extra: ClassVar[str] = ""  # pip extra that installs it: pip install 'edgelm[<extra>]'
    formats: ClassVar[tuple[str, ...]] = ()  # artifact formats it opens: "hf", "gguf", "onnx"

    def __init__(self, path: Path, *, tokenizer: TextTokenizer | None, threads: int, context: int,
                 model_bytes: int) -> None:
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.threads = threads
        self.context = context  # tokens the KV cache holds (prompt + generated)
        self.model_bytes = model_bytes  # bytes of the model file(s)
        self.keep_cache = False  # reuse the cache of the last call for a prompt that starts the same way
        self._held: list[int] = []  # the tokens in the KV cache, in order, as far as keep_cache may trust it
        self.last_cached = 0  # prompt tokens the last call found in the cache
        self.adapters: dict[str, Path] = {}  # LoRA adapters loaded over the base, by name (backends that apply them)
        self.adapter: str | None = None  # the one applied now (None: the base alone)

    # --- backend hooks -------------------------------------------------------------------------------------------
    def _prefill(self, ids: Sequence[int], max_new_tokens: int = 0) -> "np.ndarray":
        """Reset the KV cache, run ``ids``; return the next-token logits [V]. ``max_new_tokens``: the steps this call
        will take after it (0: up to the context), for backends that size their cache per call."""
        raise NotImplementedError

    def _step(self, token: int) -> "np.ndarray":
        """Append one token; return the next-token logits [V]."""
        raise NotImplementedError

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Logits [T, V] (float32) for every position of one sequence, from an empty KV cache."""
        raise NotImplementedError

    def _rewind(self, n: int) -> bool:
        """Keep the first ``n`` tokens of the KV cache and drop the rest; False where this backend can't (the prompt
        is then prefilled afresh)."""
        return False

    def _extend(self, ids: Sequence[int]) -> "np.ndarray":
        """Run ``ids`` after the cached tokens; return the next-token logits [V]."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _set_adapter(self, name: str | None) -> None:
        """Apply the loaded adapter ``name`` (None: none) to the next calls."""
        raise EdgelmError(f"the {self.name} runtime applies no LoRA adapters at run time; merge the adapter into a "
                          "new artifact instead (edgelm export ADAPTER --merge)")

    def set_adapter(self, name: str | None) -> None:
        """Switch the LoRA adapter the next calls run with (None: the base alone). The base stays loaded; the KV
        cache was made by the other weights, so the next prompt is prefilled afresh."""
        if name == self.adapter:
            return
        self.require_adapter(name)
        self._set_adapter(name)
        self.adapter = name
        self.drop_cache()

    def require_adapter(self, name: str | None) -> None:
        """Refuse, in one line, an adapter name that is not loaded (None, the base, always is)."""
        if name is not None and name not in self.adapters:
            raise EdgelmError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapters) or 'none'}")

    def drop_cache(self) -> None:
        """Forget what the KV cache holds (a reply stopped mid-step): the next call prefills afresh."""
        self._held = []

    def _start(self, ids: list[int], max_new_tokens: int) -> tuple["np.ndarray", int]:
        """(next-token logits after ``ids``, how many of them were reused from the cache). With keep_cache, the cached
        tokens that ``ids`` starts with are kept, and only the rest is run; at least one token runs, for its logits."""
        held, self._held, n = self._held, [], 0  # no record while the cache changes (a failure leaves none)
        if self.keep_cache:
            n = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
            n = min(n, len(ids) - 1)
        if n > 0 and self._rewind(n):
            logits = self._extend(ids[n:])
        else:  # a kept cache is sized for the whole context, so that later turns fit
            n, logits = 0, self._prefill(ids, 0 if self.keep_cache else max_new_tokens)
        self._held, self.last_cached = list(ids), n
        return logits, n

    def _advance(self, token: int) -> "np.ndarray":
        """_step, keeping the record of what the cache holds."""
        logits = self._step(token)
        self._held.append(token)
        return logits

    def _tokens(self, ids: list[int], cfg: GenerationConfig, stop_ids: tuple[int, ...], rng, clock: dict) -> Iterator[int]:
        """Yield chosen tokens (stop token included); record prefill time in ``clock``. Backends with a faster
        native loop for some configs override this and call ``super()._tokens`` otherwise."""
        t0 = time.perf_counter()
        logits, clock["cached"] = self._start(ids, cfg.max_new_tokens)
        clock["prefill"] = time.perf_counter() - t0
        seen = list(ids)
        for i in range(cfg.max_new_tokens):
            banned = stop_ids if i < cfg.min_new_tokens else ()
            tok = next_token(logits, cfg, seen, rng, banned)
            yield tok
            if tok in stop_ids or i + 1 == cfg.max_new_tokens:
                return
            seen.append(tok)
            logits = self._advance(tok)

    # --- shared API ------------------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special=False`` for a rendered chat, which holds its BOS already."""
        return self._tok().encode(text, special)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok().decode(ids)

    def _tok(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise EdgelmError(f"{self.path} has no tokenizer (tokenizer.json beside the model); pass token ids")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        return self._tok().apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[dict[str, str]], config: GenerationConfig | None = None, *, stream: bool = False,
             **options: Any) -> Generation | Stream:
        """Generate the assistant's reply to ``messages`` through the model's chat template."""
        return self.generate(self.encode(self.apply_chat_template(messages), special=False), config, stream=stream,
                             **options)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Exactly ``max_new_tokens`` greedy tokens (end-of-sequence masked), as transformers' min_new_tokens does."""
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        return self.generate(list(ids), cfg).ids

    def generate(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *, stream: bool = False,
                 **options: Any) -> Generation | Stream:
        """Continue ``prompt`` (text or token ids). ``options`` override fields of ``config``."""
        cfg = (config or GenerationConfig()).with_options(**options)
        t_call = time.perf_counter()
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise EdgelmError("the prompt is empty; pass some text or token ids")
        if len(ids) >= self.context:
            raise EdgelmError(f"the prompt has {len(ids)} tokens but the context holds {self.context}; shorten it")
        room = self.context - len(ids)
        if cfg.max_new_tokens > room:
            log.warning("max_new_tokens %d capped to %d by the context of %d", cfg.max_new_tokens, room, self.context)
            cfg = cfg.with_options(max_new_tokens=room, min_new_tokens=min(cfg.min_new_tokens, room))
        stop_ids = cfg.stop_ids if cfg.stop_ids is not None else (self.tokenizer.eos_ids if self.tokenizer else ())
        it = self._run(ids, cfg, tuple(stop_ids), t_call)
        if stream:
            return Stream(it)
        for item in it:
            if isinstance(item, Generation):
                return item
        raise AssertionError("generation ended without a result")

    def _run(self, ids: list[int], cfg: GenerationConfig, stop_ids: tuple[int, ...], t_call: float
             ) -> Iterator[str | Generation]:
        import numpy as np

        if cfg.num_beams > 1:
            yield from self._beam_run(ids, cfg, stop_ids, t_call)
            return
        rng = np.random.default_rng(cfg.seed)
        clock: dict[str, float] = {}
        text_out = StreamDecoder(self.decode) if self.tokenizer is not None else None
        stops = StopMatcher(cfg.stop)
        out: list[int] = []
        finish, t_first, hit = "length", None, False
        for tok in self._tokens(ids, cfg, stop_ids, rng, clock):
            if t_first is None:
                t_first = time.perf_counter()
            if tok in stop_ids and len(out) >= cfg.min_new_tokens:
                finish = "stop"
                break
            out.append(tok)
            if text_out is not None:
                delta, hit = stops.feed(text_out.push(tok))
                yield delta
                if hit:
                    finish = "stop"
                    break
        t_end = time.perf_counter()
        if text_out is not None and not hit:
            tail, hit = stops.feed(text_out.flush())
            yield tail
            if hit:
                finish = "stop"
            else:
                yield stops.finish()
        text = stops.text if text_out is not None else ""
        t_first = t_first or t_end
        yield Generation(text=text, ids=out, prompt_tokens=len(ids), finish_reason=finish,
                         prefill_s=clock.get("prefill", 0.0), ttft_s=t_first - t_call, decode_s=t_end - t_first,
                         cached_tokens=int(clock.get("cached", 0)))

    def _beam_logits(self, seqs: list[list[int]]) -> "np.ndarray":
        """Next-token logits [B, V] for each full sequence (backends may batch this)."""
        import numpy as np

        return np.stack([self.logits(s)[-1] for s in seqs])

    def _beam_run(self, ids: list[int], cfg: GenerationConfig, stop_ids: tuple[int, ...], t_call: float
                  ) -> Iterator[str | Generation]:
        """Beam search, scored by mean log-probability per generated token (length_penalty 1), stopping once
        ``num_beams`` hypotheses have ended. Each step re-reads the whole sequence: exact on every backend."""
        import numpy as np

        from edgelm.runtimes.sampling import process_logits

        k = cfg.num_beams
        beams: list[tuple[float, list[int]]] = [(0.0, [])]
        done: list[tuple[float, list[int], str]] = []
        t0 = time.perf_counter()
        for step in range(cfg.max_new_tokens):
            rows = self._beam_logits([ids + b for _, b in beams])  # [B, V]
            cands = []
            for (score, b), row in zip(beams, rows):
                x = process_logits(row, cfg, ids + b)
                if step < cfg.min_new_tokens and stop_ids:
                    x[list(stop_ids)] = -np.inf
                lp = x - np.logaddexp.reduce(x)  # log-softmax [V]
                for t in np.argsort(-lp, kind="stable")[: 2 * k]:
                    cands.append((score + float(lp[t]), b + [int(t)]))
            cands.sort(key=lambda c: -c[0])
            beams = []
            for score, b in cands:
                if b[-1] in stop_ids:
                    done.append((score / len(b), b[:-1], "stop"))
                else:
                    beams.append((score, b))
                if len(beams) == k:
                    break
            if len(done) >= k:
                break
        done += [(s / max(len(b), 1), b, "length") for s, b in beams]
        _, best, finish = max(done, key=lambda d: d[0])
        text = self.decode(best) if self.tokenizer is not None else ""
        if cfg.stop and text:
            cut = min((i for i in (text.find(s) for s in cfg.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        t_end = time.perf_counter()
        yield text
        yield Generation(text=text, ids=best, prompt_tokens=len(ids), finish_reason=finish, ttft_s=t_end - t_call,
                         decode_s=0.0, timings={"beam_search_s": t_end - t0})

    def draft(self, ids: Sequence[int], k: int, *, top_n: int = 0) -> Draft:
        """``k`` greedy tokens after ``ids`` (fewer at a stop id), with the entropy of each step's distribution and
        the log-prob of each chosen token: how sure the model is of its own start. The cooperative runtime's draft
        routers reuse the tokens when they answer here. ``top_n``: also the n largest log-probs of each step,
        largest first (what llama.cpp's server and wllama report as ``top_logprobs``)."""
        import numpy as np

        from edgelm.metrics import log_softmax_np

        if len(ids) >= self.context:
            raise EdgelmError(f"the prompt has {len(ids)} tokens but the context holds {self.context}; shorten it")
        k = min(k, self.context - len(ids))
        stop = set(self.tokenizer.eos_ids if self.tokenizer else ())
        logits, d = self._start(list(ids), k)[0], Draft([], [], [])
        for i in range(k):
            lp = log_softmax_np(logits)  # [V]
            d.ids.append(int(np.argmax(logits)))
            d.entropy.append(float(-(np.exp(lp) * lp).sum()))
            d.logprob.append(float(lp[d.ids[-1]]))
            if top_n:
                d.top_logprobs.append(np.sort(np.partition(lp, -top_n)[-top_n:])[::-1].tolist())
            if d.ids[-1] in stop or i + 1 == k:
                break
            logits = self._advance(d.ids[-1])
        return d

    def score(self, text: str | Sequence[int]) -> "LMScore":
        """Perplexity and next-token top-1 of ``text`` (or ids) under this runtime."""
        from edgelm.metrics import score_logits

        ids = self.encode(text) if isinstance(text, str) else [int(t) for t in text]
        if len(ids) < 2:
            raise EdgelmError("score needs at least 2 tokens")
        if len(ids) > self.context:
            raise EdgelmError(f"{len(ids)} tokens exceed the context of {self.context}; score a shorter text")
        return score_logits([(ids, self.logits(ids))])

    def info(self) -> dict[str, Any]:
        return {"runtime": self.name, "path": str(self.path), "threads": self.threads, "context": self.context,
                "model_bytes": self.model_bytes, **({"adapters": list(self.adapters), "adapter": self.adapter}
                                                    if self.adapters else {})}

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
