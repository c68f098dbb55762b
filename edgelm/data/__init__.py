"""Corpus: sources, deterministic per-file splits, and streaming packed token sequences."""
from edgelm.data.corpus import Corpus, CorpusSpec, split_of

__all__ = ["Corpus", "CorpusSpec", "split_of"]
