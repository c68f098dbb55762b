"""Mixed precision: every 32-wide block type packs bit-exactly, GPTQ beats rounding, the plan keeps its budget."""
from __future__ import annotations

import numpy as np
import pytest

from edgelm.errors import EdgelmError
from edgelm.quant.grids import BLOCK_TYPES, type_of
from edgelm.quant.mixed import TensorPlan, allocate, resolve_budget


def _problem(out_f=48, in_f=96, seed=0):
    """A weight and the Hessian of correlated inputs (what GPTQ exploits)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    x = torch.randn(2048, in_f, generator=g) @ mix  # [N, in]
    return w, x, (x.T @ x).double()


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_block_type_packs_bit_exactly(name):
    """gguf-py's own dequantizer reads back exactly the values PyTorch computes with (asymmetric types: up to the
    fp16 rounding of the block minimum m = -d*z, which the format stores)."""
    import gguf

    from edgelm.converters.gguf import block_size, pack_exact
    from edgelm.quant.solver import gptq_solve

    bt = BLOCK_TYPES[name]
    assert block_size(name) == (32, bt.block_bytes)  # the table agrees with gguf-py's
    w, _, h = _problem()
    ql = gptq_solve(w, h, bt.bits, bt.sym).qlinear
    assert type_of(ql) is bt
    blocks = pack_exact(ql, name, lambda a: a)  # uint8 [out, bytes per row]
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name])  # [out, in]
    ref = ql.dequantize().numpy()
    if bt.sym:
        assert np.array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=float(np.abs(ref).max()) * 2**-10)
        assert not np.array_equal(ql.zeros.numpy(), np.full_like(ql.zeros.numpy(), 2 ** (bt.bits - 1)))


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_gptq_step_beats_rounding_on_the_same_grid(name):
    from edgelm.quant.rtn import rtn_quantize
    from edgelm.quant.solver import gptq_solve

    bt = BLOCK_TYPES[name]
    w, x, h = _problem(seed=1)
    q_gptq = gptq_solve(w, h, bt.bits, bt.sym).qlinear.dequantize()
    q_rtn = rtn_quantize(w, bt.bits, 32, bt.sym).dequantize()
    err = lambda q: float(((w - q) @ x.T).pow(2).sum())  # noqa: E731 - the output error GPTQ minimises
    assert err(q_gptq) < 0.9 * err(q_rtn)


def _plans():
    # three tensors of equal size; "a" is 10x as sensitive as "b", "c" insensitive
    plans = []
    for name, sens in (("a", 10.0), ("b", 1.0), ("c", 0.0)):
        tp = TensorPlan(name, (64, 128))
        tp.kld = {t: sens * {"Q4_0": 1.0, "Q5_0": 0.4, "Q8_0": 0.01}[t] for t in ("Q4_0", "Q5_0", "Q8_0")}
        plans.append(tp)
    return plans


def test_allocation_keeps_to_its_budget_and_upgrades_the_sensitive_first():
    types = ("Q4_0", "Q5_0", "Q8_0")
    per = {t: 64 * 128 // 32 * BLOCK_TYPES[t].block_bytes for t in types}
    for budget in range(3 * per["Q4_0"], 3 * per["Q8_0"] + 1, 97):
        plans = _plans()
        allocate(plans, types, budget)
        assert sum(p.nbytes(p.choice) for p in plans) <= budget
    plans = _plans()
    allocate(plans, types, 2 * per["Q4_0"] + per["Q8_0"])  # room for one upgrade to Q8_0
    assert [p.choice for p in plans] == ["Q8_0", "Q4_0", "Q4_0"]
    plans = _plans()
    allocate(plans, types, 3 * per["Q8_0"])
    assert [p.choice for p in plans] == ["Q8_0", "Q8_0", "Q4_0"]  # no bytes spent where nothing is gained


def test_fused_qkv_share_a_type():
    """ONNX fuses q/k/v into one MatMulNBits, so a plan moves them together, even when only one is sensitive."""
    types = ("Q4_0", "Q8_0")
    plans = []
    for leaf, sens in (("q_proj", 5.0), ("k_proj", 0.0), ("v_proj", 0.0), ("o_proj", 0.1)):
        tp = TensorPlan(f"model.layers.0.self_attn.{leaf}", (64, 128))
        tp.kld = {"Q4_0": sens, "Q8_0": 0.0}
        plans.append(tp)
    allocate(plans, types, sum(p.nbytes("Q4_0") for p in plans) + 3 * (plans[0].nbytes("Q8_0") - plans[0].nbytes("Q4_0")))
    assert [p.choice for p in plans] == ["Q8_0", "Q8_0", "Q8_0", "Q4_0"]


@pytest.mark.parametrize("kw, msg", [
    ({"budget_bpw": 4.0, "max_mib": 0.0}, r"--budget-bpw 4 is outside .* 4.50 to 8.50 bits/weight"),
    ({"budget_bpw": 9.0, "max_mib": 0.0}, r"--budget-bpw 9 is outside"),
    ({"budget_bpw": 0.0, "max_mib": 0.001}, r"--max-size 0.001 MiB is outside .* MiB"),
])
def test_budget_outside_the_reachable_range_names_it(kw, msg):
    with pytest.raises(EdgelmError, match=msg):
        resolve_budget({"x": (64, 128)}, ("Q4_0", "Q8_0"), other=0, **kw)


def test_mixed_quantize_plans_within_budget_and_gguf_holds_its_types(quantized, tmp_path):
    """The plan keeps its budget; GGUF stores every planned tensor in its planned type, values exact, and the
    tied embedding is the lm_head's GPTQ grid."""
    from transformers import AutoTokenizer

    from edgelm.converters.gguf import NameMap, write_gguf
    from edgelm.converters.source import read_source
    from edgelm.manifest import read_manifest
    from edgelm.models.archs import get_arch
    from tests.converters.test_gguf import _gguf_weights

    folder, res = quantized("gptq-mixed", types=("Q4_0", "Q5_0", "Q8_0"), budget_bpw=6.0)
    plan = read_manifest(folder)["plan"]
    assert plan["bits_per_weight"] <= 6.0 and plan["bytes"] <= plan["budget_bytes"]
    assert len(plan["tensors"]) == 2 * 7 + 1 and "lm_head" in plan["tensors"]
    assert res.preset.name == "gptq-mixed+types=Q4_0,Q5_0,Q8_0"  # the default budget leaves no tag
    src = read_source(folder)
    write_gguf(src, AutoTokenizer.from_pretrained(folder), tmp_path / "m.gguf", float_type="F32")
    got = _gguf_weights(tmp_path / "m.gguf")
    arch = get_arch(src.config["model_type"])
    names = NameMap(arch, src.config["num_hidden_layers"])
    for name, info in plan["tensors"].items():
        gname = "token_embd.weight" if name == "lm_head" else names(name + ".weight")
        w, t = got[gname]
        assert t == info["type"], gname
        ref = src.qlinears[name].dequantize().numpy()
        ref = arch.permute_rows(ref, gname, src.config["num_attention_heads"], src.config["num_key_value_heads"])
        assert np.array_equal(w, ref), gname
    assert "output.weight" not in got  # tied: llama.cpp reads token_embd for the output too


def test_mixed_options_are_refused_on_other_presets():
    from edgelm.quant.presets import get_preset

    with pytest.raises(EdgelmError, match="--budget-bpw applies to mixed presets only"):
        get_preset("gptq-int4-g32").with_options(budget_bpw=5.0)
    with pytest.raises(EdgelmError, match="unknown block type 'Q3_K'"):
        get_preset("gptq-mixed").with_options(types=("Q3_K",))


@pytest.mark.parametrize("args, needles", [
    (["quantize", "--quant", "gptq-mixed", "--budget-bpw", "3"], ["--budget-bpw 3 is outside", "4.50 to 8.50"]),
    (["quantize", "--quant", "gptq-mixed", "--max-size", "1000"], ["--max-size 1000 MiB is outside", "MiB"]),
    (["quantize", "--quant", "gptq-mixed", "--types", "Q4_0", "Q3_K"], ["unknown block type 'Q3_K'"]),
    (["quantize", "--quant", "gptq-int4-g32", "--budget-bpw", "5"], ["applies to mixed presets only"]),
    (["export", "--quant", "gptq-mixed", "--types", "Q4_0", "Q5_0", "--target", "onnx"],
     ["ONNX MatMulNBits takes 4- and 8-bit codes", "Q5_0"]),
    (["export", "--quant", "gptq-int4-g32", "--imatrix"], ["--imatrix applies to llamacpp-* presets"]),
])
def test_bad_mixed_input_is_one_line_before_any_work(args, needles, tmp_path, tiny_q_model):
    from tests.artifact.test_bad_input import _fails
    from tests.conftest import run_cli

    out = tmp_path / "o"
    r = run_cli(args[0], str(tiny_q_model), *args[1:], "--out", str(out))
    _fails(r, *needles)
    assert not out.exists()


def test_onnx_shares_the_4bit_lm_head_with_the_embedding(quantized, tmp_path, tiny_corpus):
    """At the smallest budget every matrix is Q4_0: ONNX keeps one GPTQ 4-bit matrix for the embedding
    (GatherBlockQuantized) and the lm_head (MatMulNBits), so its files are about the GGUF's size, and it passes."""
    from edgelm.artifact.api import export

    folder, _ = quantized("gptq-mixed", budget_bpw=4.5)
    kw = dict(quant="gptq-mixed", budget_bpw=4.5, data=(str(tiny_corpus),), eval_seqs=4, eval_seqlen=64)
    onnx = export(model=folder, target="onnx", out=tmp_path / "onnx", **kw).manifest
    gguf = export(model=folder, target="gguf", out=tmp_path / "gguf", **kw).manifest
    assert onnx["shared_embeddings"] and onnx["ops"]["GatherBlockQuantized"] == 1 and onnx["parity"]["passed"]
    assert set(onnx["plan"]["tensors"][n]["type"] for n in onnx["plan"]["tensors"]) == {"Q4_0"}
    size = lambda m, ends: sum(f["size"] for n, f in m["files"].items() if n.endswith(ends))  # noqa: E731
    # no float embedding beside the 4-bit matrix; what ONNX adds: fp32 scales (MatMulNBits takes them in the
    # activations' type), zero points and the RoPE caches
    emb_fp32 = 640 * 256 * 4
    assert size(onnx, (".onnx", ".onnx.data")) <= size(gguf, ".gguf") + emb_fp32 // 2
    assert abs(onnx["parity"]["kld"] - gguf["parity"]["kld"]) < 0.02  # the same codes in both


def test_cli_prints_the_plan_in_one_line(tmp_path, tiny_q_model, tiny_corpus):
    import re

    from tests.conftest import run_cli

    r = run_cli("quantize", str(tiny_q_model), "--quant", "gptq-mixed", "--budget-bpw", "5.5", "--out",
                str(tmp_path / "q"), "--data", str(tiny_corpus), "--calib-samples", "8", "--calib-seqlen", "64",
                "--eval-seqs", "2", "--eval-seqlen", "64")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("types: "))
    counts = [int(n) for n in re.findall(r"(\d+) x Q\d_\d", line)]
    assert sum(counts) == 15 and re.search(r", (\d\.\d\d) bits/weight, [\d.]+ MiB of tensors$", line), line
    assert float(re.search(r"(\d\.\d\d) bits/weight", line).group(1)) <= 5.5


def test_a_one_type_plan_skips_the_sensitivity_sweep(monkeypatch, tiny_q_model, tiny_corpus, tmp_path):
    """gptq-int4-g32-all has one type, so nothing to choose: no KL probe runs, every tensor is Q4_0, and the plan
    predicts no KLD it didn't measure."""
    import edgelm.quant.mixed as mixed
    from edgelm.manifest import read_manifest
    from edgelm.quant.api import quantize
    from tests.conftest import CALIB

    def refuse(*a, **kw):
        raise AssertionError("the KL probe ran for a one-type plan")

    monkeypatch.setattr(mixed, "KldProbe", refuse)
    quantize(model=tiny_q_model, quant="gptq-int4-g32-all", out=tmp_path / "q", data=tiny_corpus, **CALIB)
    plan = read_manifest(tmp_path / "q")["plan"]
    assert {t["type"] for t in plan["tensors"].values()} == {"Q4_0"} and len(plan["tensors"]) == 15
    assert plan["predicted_kld"] is None
    with pytest.raises(AssertionError, match="KL probe"):  # two types still measure
        quantize(model=tiny_q_model, quant="gptq-mixed", out=tmp_path / "q2", data=tiny_corpus, **CALIB)


def test_an_export_suite_collects_the_hessians_once(monkeypatch, tiny_q_model, tiny_corpus, tmp_path):
    """Two mixed presets of one model in one suite (as `edgelm demo` exports them): one calibration pass."""
    from edgelm.artifact.suite import export_suite
    from tests.quant.test_hessian import _counting

    calls = _counting(monkeypatch)
    rows = export_suite(str(tiny_q_model), [("gptq-mixed", "gguf"), ("gptq-int4-g32-all", "gguf")], tmp_path,
                        data=(str(tiny_corpus),), calib_samples=8, calib_seqlen=64, eval_seqs=2, eval_seqlen=64)
    assert [r.error for r in rows] == ["", ""] and len(calls) == 1
