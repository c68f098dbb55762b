"""Generation settings and the one sampler every backend uses, so a setting means the same thing everywhere.

The order follows transformers' ``generate``: repetition penalty, then temperature, then top-k, then top-p, then a
draw from the softmax with a seeded numpy generator (one uniform per token, inverse CDF).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128  # tokens to generate at most
    min_new_tokens: int = 0  # stop tokens are masked out until this many were generated (benchmarks)
    do_sample: bool = False  # draw from the distribution; False = greedy argmax
    temperature: float = 1.0  # softmax temperature when sampling (> 0)
    top_k: int = 0  # sample among the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus: the smallest set holding this much probability (0 < top_p <= 1)
    repetition_penalty: float = 1.0  # CTRL penalty on tokens seen in prompt or output (1 = off, > 1 discourages)
    num_beams: int = 1  # beam search width; 1 = greedy or sampling
    stop: tuple[str, ...] = ()  # stop strings; generation ends before the first one and it is not returned
    stop_ids: tuple[int, ...] | None = None  # stop token ids (None: the tokenizer's end-of-sequence ids)
    seed: int | None = None  # sampling seed: the same seed gives the same tokens on the same backend

    def validate(self) -> "GenerationConfig":
        """Return self, or raise a one-line error naming the bad value and its valid range."""
        def bad(name: str, rule: str) -> EdgelmError:
            return EdgelmError(f"invalid generation setting {name}={getattr(self, name)!r}: {rule}")

        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", "must be between 0 and max_new_tokens")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0 (use do_sample=False for greedy)")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.num_beams < 1:
            raise bad("num_beams", "must be >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise bad("num_beams", "beam search is deterministic; use do_sample=False with num_beams > 1")
        if any(not s for s in self.stop):
            raise bad("stop", "stop strings must not be empty")
        return self

    def with_options(self, **kw: Any) -> "GenerationConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None}).validate()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def process_logits(logits: "np.ndarray", config: GenerationConfig, seen: Iterable[int]) -> "np.ndarray":
    """Repetition penalty and temperature on one row of logits [V] (a new float64 array)."""
    import numpy as np

    x = np.array(logits, dtype=np.float64)  # [V]
    if config.repetition_penalty != 1.0:
        idx = np.fromiter(set(seen), dtype=np.int64)
        if idx.size:
            v = x[idx]
            x[idx] = np.where(v > 0, v / config.repetition_penalty, v * config.repetition_penalty)
    if config.do_sample and config.temperature != 1.0:
        x /= config.temperature
    return x


def sample(logits: "np.ndarray", config: GenerationConfig, rng: "np.random.Generator") -> int:
    """Top-k, top-p, then one draw, on processed logits [V]."""
    import numpy as np

    order = np.argsort(-logits, kind="stable")  # [V], most likely first
    if config.top_k:
        order = order[: config.top_k]
    x = logits[order]
    p = np.exp(x - x[0])
    p /= p.sum()
    if config.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), config.top_p)) + 1  # smallest prefix with mass >= top_p
        p = p[:keep] / p[:keep].sum()
        order = order[:keep]
    u = rng.random()
    i = min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)
    return int(order[i])


def next_token(logits: "np.ndarray", config: GenerationConfig, seen: list[int], rng: "np.random.Generator",
               banned: tuple[int, ...] = ()) -> int:
    """The next token from one row of raw logits [V] under ``config``; ``banned`` ids are masked out."""
    import numpy as np

    if config.repetition_penalty == 1.0 and not config.do_sample and not banned:
        return int(np.argmax(logits))
    x = process_logits(logits, config, seen)
    if banned:
        x[list(banned)] = -np.inf
    return sample(x, config, rng) if config.do_sample else int(np.argmax(x))
