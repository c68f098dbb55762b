"""Every registered architecture (edgelm.registry.ARCHS) through every stage, on a tiny random model built from its
transformers config: distill (as teacher and as student), quantize (RTN and GPTQ), export to GGUF and ONNX with
parity, then `edgelm.load` and greedy generation on each runtime, equal to PyTorch's tokens.

The registry drives the parametrization: an architecture registered without working on every stage fails here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.registry import ARCHS

from .conftest import CALIB

# What a tiny model of an arch sets beyond the common shape: the features that set the arch apart.
ARCH_EXTRAS = {
    # Llama 3.1's scaling, extreme: every frequency but the highest divided by up to 64, so an exporter that
    # ignores it rotates differently from the first position on
    "llama": {"rope_scaling": {"rope_type": "llama3", "factor": 64.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}},
    "mistral": {"sliding_window": 96},  # below max_position_embeddings: GGUF caps its context, ONNX applies it
    "qwen3": {"head_dim": 96},  # its q/k norms on, and heads wider than hidden / heads, as Qwen3-0.6B's 128 of 1024/16
    # four layers, so that one (the fourth) has no RoPE, as llama.cpp's graph expects; SmolLM3's pad id is past
    # the tiny vocab
    "smollm3": {"num_hidden_layers": 4, "no_rope_layer_interval": 4, "pad_token_id": None},
}
# The tokenizer each arch's tiny model gets, as its real models ship: Mistral 7B a SentencePiece BPE with byte
# fallback; Qwen2's tokenizer class brings its own split regex to the byte-level BPE; the rest a GPT-2 ByteLevel BPE.
ARCH_TOKENIZER = {"mistral": "sentencepiece_tokenizer_dir"}
CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
NEW = 12


def test_extras_name_registered_archs():
    assert set(ARCH_EXTRAS) | set(ARCH_TOKENIZER) <= set(ARCHS.names())


def make_tiny(arch: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg = AutoConfig.for_model(arch, **{**shape, **ARCH_EXTRAS.get(arch, {})})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=ARCHS.names())
def arch_run(request, tmp_path_factory, tiny_corpus):
    """{"arch", "model": CE-trained tiny model (distilled as a student), "student": KD-distilled from it}."""
    from edgelm.distill.api import distill

    arch = request.param
    root = tmp_path_factory.mktemp(f"arch-{arch}")
    base = make_tiny(arch, root / "init", request.getfixturevalue(ARCH_TOKENIZER.get(arch, "tiny_tokenizer_dir")))
    # as a student: continue training the random model on CE (alpha 0), so quantization error shows in perplexity
    trained = distill(teacher=str(base), student=str(base), alpha=0.0, data=tiny_corpus, seq_len=64, batch_size=8,
                      max_steps=80, lr=2e-3, warmup_steps=10, eval_every=0, ckpt_every=0, out=str(root / "ce"),
                      force=True, progress=False, eval_seqs=4)
    # as a teacher: prune it to one block and distill with logit KD
    student = distill(teacher=str(trained.student_dir), layers=1, data=tiny_corpus, seq_len=64, batch_size=4,
                      max_steps=6, lr=1e-3, warmup_steps=2, eval_every=0, ckpt_every=0, out=str(root / "kd"),
                      force=True, progress=False, eval_seqs=4, calib_seqs=4)
    return {"arch": arch, "model": trained.student_dir, "student": student.student_dir, "root": root,
            "trained": trained, "kd": student}


def test_distill_as_teacher_and_student(arch_run):
    import json

    for res in (arch_run["trained"], arch_run["kd"]):
        cfg = json.loads((res.student_dir / "config.json").read_text())
        assert cfg["model_type"] == arch_run["arch"]
        assert res.val_student.ppl == res.val_student.ppl and res.val_student.ppl < 640  # finite, better than uniform
    assert arch_run["kd"].manifest["student"]["layers"] == 1
    assert arch_run["trained"].val_student.ppl < arch_run["trained"].val_teacher.ppl  # training helped


def _torch_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def arch_artifacts(arch_run, tiny_corpus):
    """(preset, target) -> exported artifact folder: fp32 and GPTQ int4 (from one `edgelm quantize`), GGUF, ONNX
    and TVM."""
    from edgelm.artifact.api import export
    from edgelm.quant.api import quantize

    root, model = arch_run["root"], str(arch_run["model"])
    gptq = quantize(model=model, quant="gptq-int4-g32", out=root / "gptq", data=tiny_corpus, **CALIB)
    out = {}
    for target in ("gguf", "onnx", "tvm"):
        out["fp32", target] = export(model=model, target=target, quant="fp32", out=root / f"{target}-fp32",
                                     data=tiny_corpus, **CHECK).out
        out["gptq-int4-g32", target] = export(model=str(gptq.out), target=target, quant="gptq-int4-g32",
                                              out=root / f"{target}-gptq", data=tiny_corpus, **CHECK).out
    return {"gptq": gptq, "artifacts": out}


def test_quantize_rtn_and_gptq(arch_run, arch_artifacts, tiny_corpus):
    from edgelm.models.qformat import read_quantized
    from edgelm.quant.api import quantize

    rtn = quantize(model=str(arch_run["model"]), quant="int4-g32", out=arch_run["root"] / "rtn", data=tiny_corpus,
                   **CALIB)
    for res in (rtn, arch_artifacts["gptq"]):
        cfg, tensors, qlinears = read_quantized(res.out)
        layers = ARCH_EXTRAS.get(arch_run["arch"], {}).get("num_hidden_layers", 2)
        assert cfg["model_type"] == arch_run["arch"] and len(qlinears) == 7 * layers  # every linear of every block
        assert 0 < res.quality["kld"] < res.preset.max_kld
    if ARCHS.get(arch_run["arch"]).qkv_bias:  # q/k/v biases stay float beside the codes
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= set(tensors)
    assert arch_artifacts["gptq"].quality["kld"] < rtn.quality["kld"] * 1.5  # GPTQ is not worse than RTN by much


@pytest.mark.parametrize("preset", ["fp32", "gptq-int4-g32"])
@pytest.mark.parametrize("target", ["gguf", "onnx", "tvm"])
def test_export_checks_itself(arch_run, arch_artifacts, preset, target):
    from edgelm.manifest import read_manifest

    m = read_manifest(arch_artifacts["artifacts"][preset, target])
    par = m["parity"]
    assert par["passed"] and m["source"]
    if preset == "fp32":
        assert par["greedy_identical"] == par["greedy_prompts"] == CHECK["prompts"]
    else:
        assert par["kld"] <= par["max_kld"]
    if target == "gguf":
        from edgelm.converters.gguf import read_types

        types = read_types(arch_artifacts["artifacts"][preset, target] / "model.gguf")
        arch = ARCHS.get(arch_run["arch"])
        assert ("blk.0.attn_q.bias" in types) == arch.qkv_bias
        assert ("blk.0.attn_q_norm.weight" in types) == ("blk.0.attn_k_norm.weight" in types) == arch.qk_norm
        assert ("rope_freqs.weight" in types) == ("rope_scaling" in ARCH_EXTRAS.get(arch.name, {}))
        if preset != "fp32":
            assert types["blk.0.attn_q.weight"]["type"] == "Q4_0"  # GPTQ's codes, packed exactly


def test_gptq_artifacts_agree_across_targets(arch_artifacts):
    """GGUF, ONNX and TVM hold the same GPTQ codes, so their loss against fp32 is nearly the same."""
    from edgelm.manifest import read_manifest

    kld = [read_manifest(arch_artifacts["artifacts"]["gptq-int4-g32", t])["parity"]["kld"]
           for t in ("gguf", "onnx", "tvm")]
    assert max(kld) - min(kld) <= 0.25 * max(kld) + 1e-3


@pytest.mark.parametrize("runtime", ["torch", "llamacpp", "onnx", "tvm"])
def test_load_and_generate_on_every_runtime(arch_run, arch_artifacts, runtime):
    import edgelm
    from edgelm.runtimes.sampling import GenerationConfig

    target = {"llamacpp": "gguf", "onnx": "onnx", "tvm": "tvm", "torch": "onnx"}[runtime]
    path = arch_run["model"] if runtime == "torch" else arch_artifacts["artifacts"]["fp32", target]
    with edgelm.load(path, threads=1) as rt:
        assert rt.name == runtime
        ids = rt.encode(PROMPT)
        g = rt.generate(ids, GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW))
        assert g.ids == _torch_greedy(arch_run["model"], ids, NEW)
        streamed = "".join(rt.generate(ids, GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW), stream=True))
        assert streamed == g.text
    with edgelm.load(arch_artifacts["artifacts"]["gptq-int4-g32", target], threads=1) as q:
        assert len(q.generate(ids, GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW)).ids) == NEW


def test_llamacpp_tokenizes_like_hf(arch_run, arch_artifacts, tiny_corpus):
    """The GGUF declares a pre-tokenizer llama.cpp splits exactly as the HF tokenizer does (each arch's own)."""
    import edgelm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arch_run["model"])
    texts = [p.read_text(encoding="utf-8")[:2000] for p in sorted(tiny_corpus.glob("*.py"))[:8]]
    texts += ["x  +  1\n\n\n    return  a\t\tb", "naïve café 123456 ½ 🙂 日本語", "it's we'll I'M 1,000,000"]
    with edgelm.load(arch_artifacts["artifacts"]["fp32", "gguf"], threads=1) as rt:
        for t in texts:
            assert rt.native_tokenize(t) == tok.encode(t, add_special_tokens=False), repr(t[:80])


@pytest.mark.parametrize("target", ["gguf", "onnx", "tvm"])
def test_sliding_window_caps_the_exported_context(arch_run, arch_artifacts, target):
    """A window below the context: neither llama.cpp's graph nor the ONNX builder's CPU attention applies it, so
    the artifact's context stops at the window (where both attentions are equal), and its manifest says so."""
    window = ARCH_EXTRAS.get(arch_run["arch"], {}).get("sliding_window")
    if window is None:
        pytest.skip(f"{arch_run['arch']} has no sliding window")
    import numpy as np

    import edgelm
    from edgelm.errors import EdgelmError
    from edgelm.manifest import read_manifest

    folder = arch_artifacts["artifacts"]["fp32", target]
    assert any(f"sliding window {window}" in n for n in read_manifest(folder)["notes"])
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 600, window + 40)]
    with edgelm.load(arch_run["model"], threads=1) as ref, edgelm.load(folder, threads=1) as rt:
        assert rt.context == window
        np.testing.assert_allclose(rt.logits(ids[:window]), ref.logits(ids[:window]), atol=0.25 if target == "gguf"
                                   else 1e-3)
        with pytest.raises(EdgelmError, match="exceed the context"):
            rt.logits(ids)
        assert len(rt.generate(ids[: window - 4], max_new_tokens=8).ids) <= 4  # generation stops at the window
