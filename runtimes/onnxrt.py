"""ONNX Runtime backend: onnxruntime-genai's C++ loop for generation, a plain InferenceSession for ``logits()``.

Greedy decoding runs entirely in genai's ``generate_next_token``; sampling, repetition penalty and custom stop ids
read genai's logits and choose in edgelm's sampler (runtimes/sampling.py), so they mean what they mean elsewhere.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from edgelm.converters.onnx import is_lora_input
from edgelm.errors import EdgelmError, require
from edgelm.runtimes.base import Runtime, check_threads, default_threads
from edgelm.runtimes.sampling import GenerationConfig
from edgelm.runtimes.text import TextTokenizer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class OnnxRuntime(Runtime):
    """An edgelm ONNX artifact folder (model.onnx + genai_config.json)."""

    name = "onnx"
    extra = "onnx"
    formats = ("onnx",)

    def __init__(self, folder: str | Path, *, threads: int | None = None, context: int | None = None,
                 adapters: dict[str, Path] | None = None) -> None:
        check_threads(threads)
        folder = Path(folder)
        cfg_path = folder / "genai_config.json"
        if not (folder / "model.onnx").is_file() or not cfg_path.is_file():
            raise EdgelmError(f"{folder} is not an ONNX artifact (model.onnx and genai_config.json expected)")
        try:
            self.genai_config = json.loads(cfg_path.read_text(encoding="utf-8"))
            dec = self.genai_config["model"]["decoder"]
            self.n_layers, self.n_kv, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EdgelmError(f"{cfg_path} is not a valid genai config ({e}); re-export the artifact") from None
        size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
        if threads is None:
            threads, why = default_threads(size)
            log.info("onnx: %d thread(s) (%s); --threads to change", threads, why)
        model_ctx = int(self.genai_config["model"].get("context_length", 2048))
        tok = TextTokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
        super().__init__(folder, tokenizer=tok, threads=threads, context=min(context or model_ctx, model_ctx),
                         model_bytes=size)
        eos = self.genai_config["model"].get("eos_token_id", [])
        self.genai_eos = tuple(eos if isinstance(eos, list) else [eos])
        self._session = None
        self._og_model = None
        self._gen = None
        self.og_model  # load now, so the first generate's TTFT is not the load
        self._lora: dict[str, Any] = {}  # name -> onnxruntime LoraAdapter (the InferenceSession's logits)
        self._og_adapters = None  # onnxruntime-genai's Adapters over og_model (generation)
        for name, p in (adapters or {}).items():
            self._load_adapter(name, Path(p))

    def _load_adapter(self, name: str, file: Path) -> None:
        """Load an .onnx_adapter file for both sessions, not applied yet."""
        ort = require("onnxruntime", "onnx")
        og = require("onnxruntime_genai", "onnx")
        try:
            la = ort.LoraAdapter()
            la.Load(str(file))
            if self._og_adapters is None:
                self._og_adapters = og.Adapters(self.og_model)
            self._og_adapters.load(str(file), name)
        except Exception as e:
            raise EdgelmError(f"onnxruntime could not load the adapter {file} ({str(e).splitlines()[0][:200]}); "
                              "export it against this base") from None
        self._lora[name] = la
        self.adapters[name] = file

    def _set_adapter(self, name: str | None) -> None:
        self._gen = None  # a generator runs with the adapter it was made with

    # --- plain ONNX Runtime session: all-position logits ------------------------------------------------------------
    @property
    def session(self):
        if self._session is None:
            ort = require("onnxruntime", "onnx")
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3  # errors only: an adapter-ready base's LoRA inputs warn on every load
            try:
                self._session = ort.InferenceSession(str(self.path / "model.onnx"), so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise EdgelmError(f"{self.path}/model.onnx could not be loaded ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); the file may be corrupt") from None
        return self._session

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        if len(ids) > self.context:
            raise EdgelmError(f"{len(ids)} tokens exceed the context of {self.context}")
        x = np.asarray(ids, dtype=np.int64)[None]  # [1, T]
        feeds = {}
        for inp in self.session.get_inputs():
            if inp.name == "input_ids":
                feeds[inp.name] = x
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones_like(x)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.arange(x.shape[1], dtype=np.int64)[None]
            elif inp.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, self.n_kv, 0, self.head_dim), dtype=dtype)  # [B, kv, 0, hd]
            elif is_lora_input(inp.name):
                pass  # a LoRA weight: its zero default, or the active adapter's
            else:
                raise EdgelmError(f"{self.path}/model.onnx has an input edgelm does not know: {inp.name}")
        opts = None
        if self.adapter is not None:
            ort = require("onnxruntime", "onnx")
            opts = ort.RunOptions()
            opts.add_active_adapter(self._lora[self.adapter])
        out = self.session.run(["logits"], feeds, opts)[0]  # [1, T, V]
        return out[0].astype(np.float32)

    # --- onnxruntime-genai: generation ----------------------------------------------------------------------------
    @property
    def og_model(self):
        if self._og_model is None:
            og = require("onnxruntime_genai", "onnx")
            cfg = og.Config(str(self.path))
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.threads, "inter_op_num_threads": 1, "log_severity_level": 3}}}}))
            try:
                self._og_model = og.Model(cfg)
            except Exception as e:
                raise EdgelmError(f"onnxruntime-genai could not load {self.path} ({str(e).splitlines()[0][:200]}); "
                                  "the artifact may be corrupt") from None
        return self._og_model

    def _generator(self, max_length: int, min_length: int = 0):
        og = require("onnxruntime_genai", "onnx")
        params = og.GeneratorParams(self.og_model)
        params.set_search_options(max_length=max_length, min_length=min_length, do_sample=False)
        gen = og.Generator(self.og_model, params)
        if self.adapter is not None:
            gen.set_active_adapter(self._og_adapters, self.adapter)
        return gen

    def _prefill(self, ids: Sequence[int], max_new_tokens: int = 0) -> "np.ndarray":
        import numpy as np

        # genai sizes its KV cache by max_length: sized for this call alone, never by an earlier one's
        n = len(ids) + max_new_tokens if max_new_tokens > 0 else self.context
        if n > self.context:
            raise EdgelmError(f"the prompt has {len(ids)} tokens and {max_new_tokens} more were asked for, but the "
                              f"context holds {self.context}; shorten the prompt or lower max_new_tokens")
        self._gen = self._generator(n)
        self._gen.append_tokens(np.asarray(ids, dtype=np.int32))
        return self._gen.get_logits().reshape(-1)  # [V]

    def _rewind(self, n: int) -> bool:
        if self._gen is None:
            return False
        self._gen.rewind_to(n)
        return True

    def _extend(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        self._gen.append_tokens(np.asarray(list(ids), dtype=np.int32))
        return self._gen.get_logits().reshape(-1)  # [V]

    def _step(self, token: int) -> "np.ndarray":
        import numpy as np

        self._gen.append_tokens(np.asarray([token], dtype=np.int32))
        return self._gen.get_logits().reshape(-1)  # [V]

    def _native_ok(self, cfg: GenerationConfig, stop_ids: tuple[int, ...]) -> bool:
        """genai's own greedy loop is exact when it would stop and mask on the same ids as ours."""
        return (not cfg.do_sample and cfg.repetition_penalty == 1.0 and cfg.num_beams == 1
                and set(stop_ids) == set(self.genai_eos) and not self.keep_cache)  # its loop owns its own cache

    def _tokens(self, ids: list[int], cfg: GenerationConfig, stop_ids: tuple[int, ...], rng, clock: dict) -> Iterator[int]:
        if not self._native_ok(cfg, stop_ids):
            yield from super()._tokens(ids, cfg, stop_ids, rng, clock)
            return
        import time

        import numpy as np

        gen = self._generator(len(ids) + cfg.max_new_tokens, len(ids) + cfg.min_new_tokens)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        clock["prefill"] = time.perf_counter() - t0
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    def native_greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """genai's loop with nothing of ours in between (bench's overhead baseline)."""
        import numpy as np

        gen = self._generator(len(ids) + n, len(ids) + n)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0))[len(ids):]

    def _close(self) -> None:
        self._gen = None
        self._og_adapters = None  # before the model it was made for
        self._og_model = self._session = None
