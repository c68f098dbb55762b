"""Models worked through a block at a time: the streamed reference equals the model held in memory, the export check
streamed gives today's check, and quantize/export hold no whole model (peak RSS of a subprocess, bounded from the
model's size)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgelm.models.streamed import STREAMED, apply_transforms, load_streamed
from tests.conftest import CALIB


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)).logits


def test_a_streamed_model_computes_what_the_loaded_one_does(tiny_q_model, quantized):
    """Float and GPTQ-format folders, with a target's Q8_0 transform on the tied embedding's lm_head alone (ONNX):
    the same logits, batched or not, and the same greedy tokens; no block stays loaded after a forward."""
    from edgelm.models.loader import load_model
    from edgelm.quant.grids import q8_0_roundtrip

    folder, _ = quantized("gptq-int4-g32")
    ids = np.random.default_rng(0).integers(3, 500, (3, 40))
    for src, transforms in ((tiny_q_model, {}), (folder, {"lm_head.weight": q8_0_roundtrip})):
        held, _, _ = load_model(str(src))
        apply_transforms(held, transforms)
        streamed = load_streamed(src, transforms)
        assert getattr(streamed, STREAMED)
        torch.testing.assert_close(_logits(streamed, ids), _logits(held, ids), atol=1e-5, rtol=1e-5)
        assert all(p.device.type == "meta" for layer in streamed.model.layers for p in layer.parameters())
        with torch.no_grad():
            kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(streamed.generate(torch.as_tensor(ids[:1]), **kw), held.generate(torch.as_tensor(ids[:1]), **kw))


@pytest.mark.parametrize("target, preset", [("gguf", "int4-g32"), ("tvm", "gptq-int4-g32")])
def test_the_check_streamed_is_todays_check(tiny_q_model, tiny_corpus, quantized, tmp_path, monkeypatch, target,
                                            preset):
    """EDGELM_STREAM_BYTES=0 streams every reference: the export check's figures are those of the check that holds
    the models in memory (a batched forward sums in another order: equal to 1e-5)."""
    from edgelm.artifact.api import export

    model = str(quantized(preset)[0]) if preset.startswith("gptq") else tiny_q_model
    kw = dict(model=model, target=target, quant=preset, data=(str(tiny_corpus),), **{**CALIB, "eval_seqs": 4})
    held = export(out=tmp_path / "held", **kw).manifest["parity"]
    monkeypatch.setenv("EDGELM_STREAM_BYTES", "0")
    streamed = export(out=tmp_path / "streamed", **kw).manifest["parity"]
    assert held["passed"] and streamed["passed"]
    for key in ("ppl", "ppl_ref", "kld", "top1_agree"):
        assert streamed[key] == pytest.approx(held[key], rel=1e-5, abs=1e-6), key
    for key in ("greedy_identical", "greedy_ties", "kld", "checkpoint_kld"):
        assert streamed["exact"][key] == pytest.approx(held["exact"][key], rel=1e-4, abs=1e-6), key


def _random_llama(folder, layers=12, hidden=1024, inter=4096, vocab=32000):
    """A random bf16 Llama written a block at a time (234M parameters: 470 MB of bf16, 940 MB in float32)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir()
    rng = np.random.default_rng(0)

    def rand(*shape):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).bfloat16()

    save_file({"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden).bfloat16()},
              str(folder / "model-00000.safetensors"))
    for i in range(layers):
        p = f"model.layers.{i}."
        save_file({p + "input_layernorm.weight": torch.ones(hidden).bfloat16(),
                   p + "post_attention_layernorm.weight": torch.ones(hidden).bfloat16(),
                   **{p + f"self_attn.{x}_proj.weight": rand(hidden, hidden) for x in "qkvo"},
                   p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                   p + "mlp.down_proj.weight": rand(hidden, inter)}, str(folder / f"model-{i + 1:05d}.safetensors"))
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True).save_pretrained(folder)
    return folder


def _peak_rss_mib(code: str) -> float:
    """Peak RSS of a Python child running ``code`` (Linux ru_maxrss, KiB)."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport resource\nprint('RSS', resource.getrusage("
                          "resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split("RSS")[-1]) / 1024


def test_quantize_and_export_hold_no_whole_model(tmp_path, tiny_tokenizer_dir):
    """RTN int4 of a 234M-parameter model to GGUF, and its check's streamed reference: the process's peak RSS stays
    below the imports' own plus a quarter of the model's bf16 bytes (one block and a slice of the embedding at a
    time), where holding the model in float32 would take 940 MB more."""
    from transformers import AutoTokenizer

    model = _random_llama(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(model)
    size_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    base = _peak_rss_mib("import torch, transformers, gguf, numpy\nfrom edgelm.artifact.api import export\n"
                         "from edgelm.converters import gguf as g\nfrom transformers import AutoTokenizer")
    export_rss = _peak_rss_mib(f"from edgelm.artifact.api import export\nexport(model={str(model)!r}, target='gguf', "
                               f"quant='int4-g32', check=False, out={str(tmp_path / 'o')!r})")
    ref_rss = _peak_rss_mib("import torch\nfrom edgelm.models.streamed import load_streamed\n"
                            f"m = load_streamed({str(model)!r})\n"
                            "with torch.no_grad(): m(input_ids=torch.arange(64)[None] + 3)")
    bound = base + size_mib / 4
    assert export_rss < bound and ref_rss < bound, (base, size_mib, export_rss, ref_rss)
    assert json.loads((tmp_path / "o/edgelm.json").read_text())["preset"]["name"] == "int4-g32"
