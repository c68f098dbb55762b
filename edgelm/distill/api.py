"""The distill stage's API: ``distill`` (train a student) and ``evaluate`` (perplexity of any model on a split)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgelm.metrics import LMScore

if TYPE_CHECKING:  # keep `import edgelm` free of torch
    from edgelm.distill.config import DistillConfig
    from edgelm.distill.trainer import DistillResult


def distill(config: "DistillConfig | None" = None, **kwargs: Any) -> "DistillResult":
    """Distill a student from a teacher. Keyword arguments are :class:`edgelm.DistillConfig` fields."""
    from edgelm.distill.config import DistillConfig
    from edgelm.distill.trainer import distill as _distill

    if config is None:
        config = DistillConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either a DistillConfig or keyword arguments, not both")
    return _distill(config)


@dataclass(frozen=True)
class EvalResult:
    model: str  # what was evaluated
    split: str  # corpus split
    seq_len: int  # tokens per sequence
    seqs: int  # sequences scored
    score: LMScore  # perplexity, top-1, tokens

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "split": self.split, "seq_len": self.seq_len, "seqs": self.seqs, **self.score.as_dict()}


def evaluate(
    model: str | os.PathLike,
    *,
    data: tuple[str, ...] | list[str] = (),
    text_field: str = "text",
    split: str = "test",
    seq_len: int = 256,
    max_seqs: int = 64,
    batch_size: int = 4,
    threads: int | None = None,
) -> EvalResult:
    """Perplexity and next-token top-1 accuracy of any loadable model on a corpus split."""
    from edgelm.errors import EdgelmError

    for name, value, low in (("seq_len", seq_len, 2), ("max_seqs", max_seqs, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise EdgelmError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    import torch

    from edgelm.data.corpus import Corpus, CorpusSpec, eval_sequences
    from edgelm.manifest import read_manifest
    from edgelm.metrics import score_lm
    from edgelm.models.loader import load_model

    if threads:
        torch.set_num_threads(threads)
    if os.path.isdir(model):
        read_manifest(model)  # refuses a folder whose files don't match its manifest
    lm, tok, _ = load_model(model)
    corpus = Corpus(CorpusSpec(data, text_field=text_field))
    seqs = eval_sequences(corpus, tok, split, seq_len, max_seqs)
    if len(seqs) == 0:
        raise EdgelmError(f"the {split} split has no full {seq_len}-token sequence; add data or lower --seq-len")
    return EvalResult(str(model), split, seq_len, len(seqs), score_lm(lm, seqs, batch_size=batch_size))
