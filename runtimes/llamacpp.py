"""llama.cpp backend through llama-cpp-python: GGUF artifacts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class LlamaCppModel:
    """One GGUF file, with logits for every position (for perplexity/KLD) and greedy decoding."""

    def __init__(self, path: str | Path, *, threads: int = 1, n_ctx: int = 0) -> None:
        from edgelm.converters.gguf import require_llama_cpp

        require_llama_cpp()
        from llama_cpp import Llama

        self.path = Path(path)
        if not self.path.is_file():
            raise EdgelmError(f"{self.path} does not exist; pass a .gguf file or an artifact folder")
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                             logits_all=True, verbose=False, n_batch=512)
        except Exception as e:
            raise EdgelmError(f"llama.cpp could not load {self.path} ({type(e).__name__}: {e}); "
                              "the file may be corrupt or truncated") from None

    def close(self) -> None:
        """Free llama.cpp's model and context now (its __del__ can fail at interpreter exit)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Logits [T, V] (float32) for one sequence, from an empty KV cache."""
        import numpy as np

        if len(ids) > self.llm.n_ctx():
            raise EdgelmError(f"{len(ids)} tokens exceed the context of {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation by argmax over llama.cpp's logits (no sampler in between)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out
