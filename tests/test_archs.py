"""Every registered architecture (edgelm.registry.ARCHS) through every stage, on a tiny random model built from its
transformers config: distill (as teacher and as student), quantize (RTN and GPTQ), export to GGUF and ONNX with
parity, then `edgelm.load` and greedy generation on each runtime, equal to PyTorch's tokens.

The registry drives the parametrization: an architecture registered without working on every stage fails here.
"""
from __future__ import annotations

import json
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
    # Phi-4-mini's partial rotary (a quarter of each head here) and LongRoPE: short factors far from 1 and an
    # attention factor of sqrt(1 + ln 2 / ln 256) from a context twice the original; the export stops at 256
    "phi3": {"pad_token_id": None, "partial_rotary_factor": 0.25, "original_max_position_embeddings": 256,
             "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(8)],
                              "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 256}},
    # Gemma 3's pattern in two layers: a sliding window shorter than the check's sequences on the first, full
    # attention with its own theta and Gemma 3 4B's linear scaling on the second; a query_pre_attn_scalar that is
    # not the head width
    "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 48, "sliding_window": 40,
                    "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": None,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
}
# The tokenizer each arch's tiny model gets, as its real models ship (tests/tokenizer_fixtures.py): Llama 3's split,
# Mistral 7B's SentencePiece BPE with byte fallback, Qwen's digit-by-digit split and ChatML, Phi-4-mini's GPT-4o-style
# split, Gemma's SentencePiece; Qwen2's tokenizer class brings its own split regex; SmolLM3 a GPT-2 ByteLevel BPE.
ARCH_TOKENIZER = {"llama": "llama3_tokenizer_dir", "mistral": "sentencepiece_tokenizer_dir",
                  "qwen3": "qwen_tokenizer_dir", "phi3": "gpt4o_tokenizer_dir", "gemma3_text": "gemma_tokenizer_dir"}
CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
NEW = 12


def test_extras_name_registered_archs():
    assert set(ARCH_EXTRAS) | set(ARCH_TOKENIZER) <= set(ARCHS.names())


def make_tiny(arch: str, out: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    gen = tokenizer_dir / "generation_config.json"  # a chat family's end-of-generation ids, as its models list them
    eos = json.loads(gen.read_text())["eos_token_id"] if gen.is_file() else tok.eos_token_id
    shape = dict(vocab_size=640, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                 eos_token_id=eos, bos_token_id=tok.bos_token_id)
    cfg = AutoConfig.for_model(arch, **{**shape, **ARCH_EXTRAS.get(arch, {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out)
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
        linears = ARCHS.get(arch_run["arch"]).linears()  # the Llama block's seven, Phi-3's four with fused ones
        assert cfg["model_type"] == arch_run["arch"] and len(qlinears) == len(linears) * layers  # every one
        assert {n.split(".", 3)[3] for n in qlinears} == set(linears)
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
        # a scaled RoPE as llama.cpp carries it: a frequency table (Llama 3's rope_freqs, Phi-3's rope_factors) or
        # its linear scaling keys (Gemma 3's global layers)
        import gguf

        from edgelm.converters.gguf import NameMap

        keys = set(gguf.GGUFReader(arch_artifacts["artifacts"][preset, target] / "model.gguf").fields)
        scaling = f"{NameMap(arch, 2).gguf_arch_name}.rope.scaling.factor" in keys
        tables = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"} & set(types)
        assert bool(tables) + scaling == ("rope_scaling" in ARCH_EXTRAS.get(arch.name, {}))
        if preset != "fp32":
            q = "blk.0.attn_qkv.weight" if arch.fused else "blk.0.attn_q.weight"  # Phi-3's fused projection
            assert types[q]["type"] == "Q4_0"  # GPTQ's codes, packed exactly


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
    # the family's special tokens inside text, as a rendered chat holds them
    texts += [" ".join(tok.all_special_tokens) + "\nhi" + "".join(tok.all_special_tokens) + "def f():  pass"]
    with edgelm.load(arch_artifacts["artifacts"]["fp32", "gguf"], threads=1) as rt:
        for t in texts:
            assert rt.native_tokenize(t) == tok.encode(t, add_special_tokens=False), repr(t[:80])


CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a string s."},
        {"role": "assistant", "content": "def rev(s):\n    return s[::-1]"}, {"role": "user", "content": "Thanks! 42"}]


@pytest.mark.parametrize("runtime", ["torch", "llamacpp", "llamacpp-bare", "onnx", "tvm"])
def test_a_two_turn_chat_renders_and_tokenizes_as_hf(arch_run, arch_artifacts, runtime, tmp_path):
    """The family's chat template renders a two-turn conversation to HF's apply_chat_template(tokenize=True) ids, the
    BOS once, on every runtime, a bare .gguf too (its template and vocab are llama.cpp's own); and every runtime
    stops at the model's end-of-generation tokens (generation_config.json's list), not only at its eos_token."""
    import shutil

    import edgelm
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(arch_run["model"])
    if not tok.chat_template:
        pytest.skip(f"the {arch_run['arch']} row's tokenizer has no chat template")
    want = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    path = {"torch": arch_run["model"], "llamacpp": arch_artifacts["artifacts"]["fp32", "gguf"],
            "onnx": arch_artifacts["artifacts"]["fp32", "onnx"], "tvm": arch_artifacts["artifacts"]["fp32", "tvm"]}
    if runtime == "llamacpp-bare":
        path[runtime] = shutil.copy(path["llamacpp"] / "model.gguf", tmp_path / "model.gguf")
    eog = GenerationConfig.from_pretrained(arch_run["model"]).eos_token_id
    with edgelm.load(path[runtime], threads=1) as rt:
        assert rt.encode(rt.apply_chat_template(CHAT), special=False) == want
        assert set([eog] if isinstance(eog, int) else eog) <= set(rt.tokenizer.eos_ids)


@pytest.mark.parametrize("target", ["gguf", "onnx", "tvm"])
def test_sliding_windows_are_applied_or_cap_the_context(arch_run, arch_artifacts, target):
    """A window below the context. Where the target's runtime applies the arch's windows (Gemma 3 on every target),
    the artifact keeps the whole context and matches PyTorch past the window, prefilled and decoded; elsewhere
    (Mistral: neither llama.cpp's graph nor the ONNX builder's attention applies it) the context stops at the
    window, where both attentions are equal, and the manifest says so."""
    import numpy as np

    import edgelm
    from edgelm.errors import EdgelmError
    from edgelm.manifest import read_manifest
    from edgelm.models.loader import read_config

    cfg = read_config(arch_run["model"])
    arch = ARCHS.get(arch_run["arch"])
    window = min((w for w in arch.windows(cfg) if w), default=0)
    if not window:
        pytest.skip(f"{arch_run['arch']} has no sliding window")
    folder = arch_artifacts["artifacts"]["fp32", target]
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 600, window + 40)]
    atol = 0.25 if target == "gguf" else 1e-3
    with edgelm.load(arch_run["model"], threads=1) as ref, edgelm.load(folder, threads=1) as rt:
        if arch.applies_windows(cfg, target):
            assert rt.context == cfg["max_position_embeddings"]
            np.testing.assert_allclose(rt.logits(ids), ref.logits(ids), atol=atol)  # every position, past the window
            assert rt.greedy(ids, 8) == ref.greedy(ids, 8)  # one token at a time over a cache longer than the window
            return
        assert any(f"sliding window {window}" in n for n in read_manifest(folder)["notes"])
        assert rt.context == window
        np.testing.assert_allclose(rt.logits(ids[:window]), ref.logits(ids[:window]), atol=atol)
        with pytest.raises(EdgelmError, match="exceed the context"):
            rt.logits(ids)
        assert len(rt.generate(ids[: window - 4], max_new_tokens=8).ids) <= 4  # generation stops at the window
