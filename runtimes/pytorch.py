"""PyTorch backend: an HF folder (a student, a GPTQ checkpoint dequantized), a .gguf dequantized by transformers,
a built-in name or a hub id. The reference every other backend is checked against."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgelm.errors import EdgelmError
from edgelm.runtimes.base import Runtime, check_threads, default_threads
from edgelm.runtimes.text import TextTokenizer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class TorchRuntime(Runtime):
    name = "torch"
    extra = ""
    formats = ("hf", "gguf")

    def __init__(self, spec: str | Path, *, threads: int | None = None, context: int | None = None) -> None:
        import torch

        from edgelm.models.loader import load_model, resolve

        check_threads(threads)
        source = resolve(str(spec))
        folder = Path(source.path)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
        if threads is None:
            threads, why = default_threads(size)
            log.info("torch: %d thread(s) (%s); --threads to change", threads, why)
        torch.set_num_threads(threads)
        self.model, hf_tok, _ = load_model(str(spec))
        self.hf_tokenizer = hf_tok
        self.model.eval()
        tok = TextTokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else _from_hf(hf_tok)
        model_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))
        super().__init__(folder, tokenizer=tok, threads=threads, context=min(context or model_ctx, model_ctx),
                         model_bytes=size)
        self._cache = None

    def _forward(self, ids: Sequence[int], cache=None):
        import torch

        with torch.inference_mode():
            x = torch.as_tensor([list(ids)], dtype=torch.long)  # [1, T]
            return self.model(input_ids=x, past_key_values=cache, use_cache=cache is not None)

    def _prefill(self, ids: Sequence[int], max_new_tokens: int = 0) -> "np.ndarray":
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self.model.config)
        out = self._forward(ids, self._cache)
        return out.logits[0, -1].float().numpy()  # [V]

    def _rewind(self, n: int) -> bool:
        if self._cache is None or n > self._cache.get_seq_length():
            return False
        try:
            self._cache.crop(n - self._cache.get_seq_length())  # minus the tokens to drop
            # (a sliding-window layer that has dropped its oldest keys can't go back: start afresh)
        except Exception as e:  # noqa: BLE001 (transformers raises various types here)
            log.debug("torch: the cache can't be cropped to %d tokens (%s); prefilling afresh", n, e)
            return False
        return self._cache.get_seq_length() == n

    def _extend(self, ids: Sequence[int]) -> "np.ndarray":
        return self._forward(ids, self._cache).logits[0, -1].float().numpy()  # [V]

    def _step(self, token: int) -> "np.ndarray":
        return self._forward([token], self._cache).logits[0, -1].float().numpy()  # [V]

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        if len(ids) > self.context:
            raise EdgelmError(f"{len(ids)} tokens exceed the context of {self.context}")
        return self._forward(ids).logits[0].float().numpy()  # [T, V]

    def _beam_logits(self, seqs: list[list[int]]) -> "np.ndarray":
        import torch

        if len({len(s) for s in seqs}) != 1:
            return super()._beam_logits(seqs)
        with torch.inference_mode():
            return self.model(input_ids=torch.as_tensor(seqs)).logits[:, -1].float().numpy()  # [B, V]

    def native_greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """Argmax decode with the model and its cache only (bench's overhead baseline)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out: list[int] = []
        with torch.inference_mode():
            logits = self.model(input_ids=torch.as_tensor([list(ids)]), past_key_values=cache, use_cache=True).logits
            for _ in range(n):
                t = logits[0, -1].argmax()
                out.append(int(t))
                logits = self.model(input_ids=t.view(1, 1), past_key_values=cache, use_cache=True).logits
        return out

    def _close(self) -> None:
        self._cache = None


def _from_hf(hf_tok) -> TextTokenizer:
    eos = hf_tok.eos_token_id
    return TextTokenizer(lambda s, special=True: hf_tok.encode(s, add_special_tokens=special),
                         lambda ids: hf_tok.decode(list(ids), skip_special_tokens=True),
                         eos_ids=(eos,) if eos is not None else (), bos_token=hf_tok.bos_token or "",
                         eos_token=hf_tok.eos_token or "", chat_template=getattr(hf_tok, "chat_template", None))
