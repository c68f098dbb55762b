"""llama.cpp backend through llama-cpp-python 0.3.36: GGUF artifacts, or any .gguf file.

The decode loop talks to llama.cpp's context and batch directly (``llama_decode``, then the logits of the last
position only), skipping ``Llama.eval``'s per-call copies of every position's logits.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgelm.errors import EdgelmError, require_llama_cpp
from edgelm.runtimes.base import Runtime, check_threads, default_threads
from edgelm.runtimes.text import TextTokenizer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # KV cache tokens unless asked otherwise (the model's own may be 8k+: memory)


class LlamaCppRuntime(Runtime):
    name = "llamacpp"
    extra = "llamacpp"
    formats = ("gguf",)

    def __init__(self, path: str | Path, *, threads: int | None = None, context: int | None = None,
                 adapters: dict[str, Path] | None = None) -> None:
        require_llama_cpp()
        from llama_cpp import Llama

        check_threads(threads)
        path = Path(path)
        file = path / "model.gguf" if path.is_dir() else path
        if not file.is_file():
            raise EdgelmError(f"{path} is not a GGUF file or a GGUF artifact folder (model.gguf)")
        size = file.stat().st_size
        if threads is None:
            threads, why = default_threads(size)
            log.info("llamacpp: %d thread(s) (%s); --threads to change", threads, why)
        n_train = _context_length(file)
        want_ctx = context or min(DEFAULT_CONTEXT, n_train or DEFAULT_CONTEXT)  # no more than the model was trained on
        try:
            self.llm = Llama(model_path=str(file), n_ctx=want_ctx, n_threads=threads, n_threads_batch=threads,
                             logits_all=False, verbose=False, n_batch=512)
        except Exception as e:
            raise EdgelmError(f"llama.cpp could not load {file} ({type(e).__name__}: {e}); "
                              "the file may be corrupt or truncated") from None
        tok = TextTokenizer.from_folder(file.parent) if (file.parent / "tokenizer.json").is_file() else self._native_tokenizer()
        super().__init__(path, tokenizer=tok, threads=threads, context=min(want_ctx, self.llm.n_ctx()), model_bytes=size)
        self.file = file
        self.n_vocab = self.llm.n_vocab()
        self.n_past = 0
        self._lora: dict[str, int] = {}  # adapter name -> llama.cpp's llama_adapter_lora pointer
        for name, p in (adapters or {}).items():
            self._load_adapter(name, Path(p))

    def _load_adapter(self, name: str, file: Path) -> None:
        """Load a GGUF LoRA adapter file over the base, not applied yet."""
        import llama_cpp

        from edgelm.fsutil import quiet_fds

        with quiet_fds("edgelm-lora-"):  # llama.cpp logs each adapted tensor's buffer type
            ptr = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(file).encode("utf-8"))
        if not ptr:
            raise EdgelmError(f"llama.cpp could not load the LoRA adapter {file} over {self.file} (its tensors do "
                              "not fit this base); export the adapter against this base")
        self._lora[name] = ptr
        self.adapters[name] = file

    def _set_adapter(self, name: str | None) -> None:
        import ctypes

        import llama_cpp

        n = 0 if name is None else 1
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora[name] if name else None)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr, n, scales):
            raise EdgelmError(f"llama.cpp could not apply the adapter {name!r}")
        self._reset()

    def _native_tokenizer(self) -> TextTokenizer:
        """llama.cpp's own vocab, for a bare .gguf. Pieces are read with a buffer that fits any token."""
        import ctypes

        import llama_cpp

        vocab = self.llm._model.vocab

        def piece(t: int) -> bytes:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(vocab, t, buf, size, 0, False)
                if n >= 0:
                    return buf.raw[:n]
                size = -n

        # every end-of-generation token llama.cpp knows (eos, eot, eom and the <|im_end|>, <end_of_turn>, <|end|>
        # family it finds by name), not only token_eos()
        eog = tuple(t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, t))
        meta = self.llm.metadata

        def text(t: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, t).decode("utf-8", errors="replace") if t >= 0 else ""

        # special=True (a plain prompt): the BOS the GGUF asks for; False (a rendered chat, which holds its own)
        return TextTokenizer(
            lambda s, special=True: self.llm.tokenize(s.encode("utf-8"), add_bos=special, special=True),
            lambda ids: b"".join(piece(int(t)) for t in ids).decode("utf-8", errors="replace"),
            eos_ids=eog or (int(self.llm.token_eos()),), bos_token=text(llama_cpp.llama_vocab_bos(vocab)),
            eos_token=text(llama_cpp.llama_vocab_eos(vocab)), chat_template=meta.get("tokenizer.chat_template"))

    def native_tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """llama.cpp's tokenizer (the artifact's tokenizer.json is what generate uses)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _decode(self, ids: Sequence[int], all_logits: bool) -> "np.ndarray":
        """Run ``ids`` after the cached ones; logits [len(ids) or 1, V]."""
        import numpy as np

        ctx, batch, nb = self.llm._ctx, self.llm._batch, self.llm.n_batch
        rows = []
        for i in range(0, len(ids), nb):
            chunk = ids[i : i + nb]
            batch.set_batch(batch=chunk, n_past=self.n_past, logits_all=all_logits)
            ctx.decode(batch)
            self.n_past += len(chunk)
            n = len(chunk) if all_logits else 1
            if all_logits or i + nb >= len(ids):
                rows.append(np.ctypeslib.as_array(ctx.get_logits(), shape=(n, self.n_vocab)).copy())  # [n, V]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _reset(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self.n_past = 0
        self._held = []

    def _rewind(self, n: int) -> bool:
        # llama.cpp refuses a partial removal its memory can't do (a sliding-window cache that has dropped keys)
        if not self.llm._ctx.kv_cache_seq_rm(0, n, -1):
            return False
        self.n_past = n
        return True

    def _extend(self, ids: Sequence[int]) -> "np.ndarray":
        return self._decode(list(ids), False)[-1]

    def _prefill(self, ids: Sequence[int], max_new_tokens: int = 0) -> "np.ndarray":
        self._reset()
        return self._decode(list(ids), False)[-1]

    def _step(self, token: int) -> "np.ndarray":
        return self._decode([token], False)[-1]

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        if len(ids) > self.context:
            raise EdgelmError(f"{len(ids)} tokens exceed the context of {self.context}")
        self._reset()
        return self._decode(list(ids), True).astype("float32", copy=False)

    def native_greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """Argmax decode on llama.cpp's context with nothing of ours in between (bench's overhead baseline)."""
        import numpy as np

        self._reset()
        logits = self._decode(list(ids), False)[-1]
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits)))
            logits = self._decode(out[-1:], False)[-1]
        return out

    def _close(self) -> None:
        """Free llama.cpp's model and context now (its __del__ can fail at interpreter exit)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self._lora = {}  # llama.cpp frees the adapters with their model
            llm.close()
            self.llm = None


def _context_length(file: Path) -> int | None:
    """``<arch>.context_length`` from the GGUF header, or None."""
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(file))
        arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
        f = r.fields.get(f"{arch}.context_length")
        return int(f.parts[-1][0]) if f is not None else None
    except Exception:  # unreadable here: llama.cpp's own load reports it
        return None
