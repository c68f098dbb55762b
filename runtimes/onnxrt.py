"""ONNX Runtime backend: a plain InferenceSession for logits, onnxruntime-genai's C++ loop for generation."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


def require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgelmError(f"{module} is not installed; pip install 'edgelm[onnx]'") from None


class OnnxModel:
    """An edgelm ONNX artifact folder (model.onnx + genai_config.json)."""

    def __init__(self, folder: str | Path, *, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.threads = threads
        cfg_path = self.folder / "genai_config.json"
        if not (self.folder / "model.onnx").is_file() or not cfg_path.is_file():
            raise EdgelmError(f"{self.folder} is not an ONNX artifact (model.onnx and genai_config.json expected)")
        self.genai_config = json.loads(cfg_path.read_text(encoding="utf-8"))
        dec = self.genai_config["model"]["decoder"]
        self.n_layers, self.n_kv, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        self.context = self.genai_config["model"].get("context_length", 2048)
        self._session = None
        self._og_model = None

    @property
    def session(self):
        if self._session is None:
            ort = require("onnxruntime")
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            try:
                self._session = ort.InferenceSession(str(self.folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise EdgelmError(f"{self.folder}/model.onnx could not be loaded ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); the file may be corrupt") from None
        return self._session

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Logits [T, V] (float32) for one sequence, from an empty KV cache."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)[None]  # [1, T]
        feeds = {}
        for inp in self.session.get_inputs():
            if inp.name == "input_ids":
                feeds[inp.name] = ids
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones_like(ids)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            elif inp.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, self.n_kv, 0, self.head_dim), dtype=dtype)  # [B, kv, 0, hd]
            else:
                raise EdgelmError(f"{self.folder}/model.onnx has an input edgelm does not know: {inp.name}")
        out = self.session.run(["logits"], feeds)[0]  # [1, T, V]
        return out[0].astype(np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation through onnxruntime-genai's generation loop."""
        og = require("onnxruntime_genai")
        if self._og_model is None:
            cfg = og.Config(str(self.folder))
            self._og_model = og.Model(cfg)
        params = og.GeneratorParams(self._og_model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        gen = og.Generator(self._og_model, params)
        gen.append_tokens(list(ids))
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0))[len(ids):]
