"""Every registered preset x target pair on a tiny model: exported and checked, or refused with a clear error."""
from __future__ import annotations

import pytest

from edgelm.errors import EdgelmError
from edgelm.artifact.api import export
from edgelm.artifact.check import EXACT_METHODS, READ_BACK_RTOL
from edgelm.runtimes.api import open_artifact
from edgelm.manifest import read_manifest
from edgelm.quant.presets import get_preset
from edgelm.registry import QUANTS, TARGETS

LLAMACPP = ["llamacpp-q8_0", "llamacpp-q6_k", "llamacpp-q5_k_m", "llamacpp-q4_k_m", "llamacpp-q4_0", "llamacpp-q2_k"]
WEIGHT_ONLY = ["fp32", "fp16", "int8", "int8-g32", "int4-g32", "int4-g128", "gptq-int4-g32", "gptq-int4-g128", "gptq-int8",
               "gptq-mixed", "gptq-int4-g32-all"]
# Every pair must be listed; a new preset or target without a test fails test_every_pair_is_tested.
PAIRS = [(p, t) for t in ("gguf", "onnx", "tvm") for p in WEIGHT_ONLY + LLAMACPP]
CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)


def test_every_pair_is_tested():
    assert sorted(PAIRS) == sorted((q, t) for q in QUANTS.names() for t in TARGETS.names())


@pytest.mark.parametrize("preset, target", PAIRS)
def test_pair(preset, target, tmp_path, tiny_q_model, tiny_corpus, quantized):
    p = get_preset(preset)
    out = tmp_path / "art"
    data = (str(tiny_corpus),)
    if target not in p.targets:
        with pytest.raises(EdgelmError, match=f"cannot be exported to {target}; presets for {target}: .*fp32"):
            export(model=tiny_q_model, target=target, quant=preset, out=out, data=data)
        assert not out.exists()
        return
    # rtn/gptq presets export an `edgelm quantize` folder (the one-step path is tested in test_cli_export)
    src = quantized(preset)[0] if p.weight_only else tiny_q_model
    res = export(model=src, target=target, quant=preset, out=out, data=data, **CHECK)
    m = read_manifest(out)  # checks every sha256
    assert m == res.manifest and m["kind"] == f"export-{target}" and m["preset"]["name"] == preset
    assert m["file"] in m["files"] and "tokenizer.json" in m["files"]
    assert m["source"]["sha256"]
    par = m["parity"]
    assert par["passed"] and par["split"] == "val" and par["tokens"] == 4 * 64
    if p.method == "none":
        assert par["greedy_identical"] == par["greedy_prompts"] == 2
        assert par["max_abs_logit_diff"] <= TARGETS.get(target).logit_atol
    else:
        assert 0 <= par["kld"] <= p.max_kld and par["top1_agree"] > 0.6
    if p.method in EXACT_METHODS:  # checked against the dequantized checkpoint it packs
        ex = par["exact"]
        assert ex["greedy_identical"] + ex["greedy_ties"] == ex["greedy_prompts"] == 2
        assert ex["logit_atol"] == TARGETS.get(target).exact_atol
        assert par["read_back"]["tensors"] > 0 and par["read_back"]["max_rel_weight_diff"] <= READ_BACK_RTOL
        assert (ex["max_abs_logit_diff"] <= ex["logit_atol"] if ex["logit_atol"] is not None
                else ex["kld"] <= ex["max_kld_vs_checkpoint"])
        assert par["kld"] <= ex["max_kld"]
        assert par["max_abs_logit_diff"] > 0  # a quantized artifact is not the fp32 model
    if target == "gguf":
        assert m["fallback_tensors"] == []  # hidden 256 fits every llama.cpp block
        if p.method in ("rtn", "gptq"):
            exact = {(4, True): "Q4_0", (8, True): "Q8_0"}[(p.bits, p.sym)]
            # 2 layers x 7 linears; the (tied) embedding is Q8_0 in quantized exports
            assert m["tensor_types"][exact] == 14 + (exact == "Q8_0") and m["tensor_types"]["Q8_0"] >= 1
        if p.method == "mixed":  # 14 linears and the tied embedding, each in its planned type
            planned = [t["type"] for t in m["plan"]["tensors"].values()]
            assert len(planned) == 15 and m["plan"]["bits_per_weight"] <= p.budget_bpw
            if len(p.types) == 1:  # nothing to choose: every matrix, the tied embedding too, in that type
                assert set(planned) == set(p.types)
            assert {t: planned.count(t) for t in set(planned)} == {t: n for t, n in m["tensor_types"].items()
                                                                  if t not in ("F32",)}
    elif target == "tvm":
        bits = m["quantized_tensors"]  # HF module -> code width; a quantized preset's tied embedding is Q8_0
        assert m["arch"] == "x86-64" and m["checked_on"] == "this build"
        if p.method == "none":
            assert bits == {}
        elif p.method == "mixed":
            width = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
            assert bits == {n.removeprefix("model."): width[t["type"]] for n, t in m["plan"]["tensors"].items()}
        else:
            assert len(bits) == 15 and bits.pop("lm_head") == 8 and set(bits.values()) == {p.bits}
    else:
        # per layer: fused qkv, o, gate, up, down; plus the 8-bit lm_head
        assert m["ops"].get("MatMulNBits", 0) == (0 if p.method in ("none", "cast") else 2 * 5 + 1)
        if p.method == "mixed":  # a 4-bit lm_head is shared with the embedding; an 8-bit one can't be (yet)
            shared = m["plan"]["tensors"]["lm_head"]["type"] == "Q4_0"
            assert m["shared_embeddings"] == shared and m["ops"].get("GatherBlockQuantized", 0) == int(shared)
    rt = open_artifact(out)
    assert len(rt.greedy([5, 6, 7], 3)) == 3


def test_cli_export_one_step_gptq(tmp_path, tiny_q_model, tiny_corpus):
    """`edgelm export MODEL --quant gptq-...` quantizes (train-split calibration) and exports in one command."""
    from tests.conftest import run_cli

    out = tmp_path / "q4"
    r = run_cli("export", str(tiny_q_model), "--target", "gguf", "--quant", "gptq-int4-g32", "--out", str(out),
                "--data", str(tiny_corpus), "--calib-samples", "8", "--calib-seqlen", "64", "--eval-seqs", "4",
                "--eval-seqlen", "64")
    assert r.returncode == 0, r.stderr
    assert "exported:" in r.stdout and "check: passed" in r.stdout
    m = read_manifest(out)
    assert m["source"]["calibration"] == {"split": "train", "samples": 8, "seqlen": 64, "seed": 0}
    assert m["tensor_types"]["Q4_0"] == 14


def test_no_check_warns_and_says_so(tmp_path, tiny_q_model):
    from tests.conftest import run_cli

    r = run_cli("export", str(tiny_q_model), "--target", "onnx", "--out", str(tmp_path / "o"), "--no-check")
    assert r.returncode == 0, r.stderr
    assert "--no-check" in r.stderr and "check: skipped" in r.stdout
    assert read_manifest(tmp_path / "o")["parity"] == {"skipped": True}


def test_parity_check_catches_a_broken_export(tmp_path, tiny_tokenizer_dir, tiny_corpus):
    """onnxruntime-genai 0.18 mis-builds a 512-token vocab at hidden 256; the check must refuse the artifact."""
    from tests.conftest import make_tiny_llama, run_cli

    model = make_tiny_llama(tmp_path / "m", tiny_tokenizer_dir, layers=1, hidden=256, inter=512)
    out = tmp_path / "broken"
    r = run_cli("export", str(model), "--target", "onnx", "--out", str(out), "--data", str(tiny_corpus),
                "--eval-seqs", "2", "--eval-seqlen", "32")
    assert r.returncode == 4
    assert r.stderr.strip().splitlines()[-1].startswith("edgelm: error: fp32 parity failed")
    assert "Traceback" not in r.stderr and not out.exists()
    assert not list(tmp_path.glob(".broken*"))  # no temp folder left behind
    ok = run_cli("export", str(model), "--target", "gguf", "--out", str(tmp_path / "g"), "--data", str(tiny_corpus),
                 "--eval-seqs", "2", "--eval-seqlen", "32")
    assert ok.returncode == 0, ok.stderr  # the same model is fine through GGUF


def test_top_level_api_is_lazy_and_callable():
    import subprocess
    import sys

    code = ("import sys, edgelm; assert callable(edgelm.export) and callable(edgelm.quantize); "
            "assert 'torch' not in sys.modules; import edgelm.artifact.api; assert callable(edgelm.export)")
    subprocess.run([sys.executable, "-c", code], check=True)
