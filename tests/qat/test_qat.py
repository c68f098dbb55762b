"""`edgelm qat`: trains onto the grid, resumes bit-identically, writes the codes its forward used, and exports them
exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgelm.errors import EdgelmError
from edgelm.manifest import read_manifest
from edgelm.qat.api import qat
from tests.conftest import kill_when, run_cli
from tests.distill.test_trainer import _cli_args


def _args(model, corpus, out, **kw) -> dict:
    base = dict(model=str(model), data=(str(corpus),), seq_len=64, batch_size=4, max_steps=8, lr=1e-3,
                warmup_steps=1, eval_every=4, ckpt_every=4, eval_seqs=8, out=str(out), progress=False, threads=1,
                bf16="off")
    base.update(kw)
    return base


def _evals(run) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "eval"]


def test_qat_trains_onto_the_grid_and_writes_the_codes_it_used(tiny_q_model, tiny_corpus, tmp_path):
    from edgelm.metrics import score_lm
    from edgelm.models.qformat import load_quantized_model, read_quantized
    from edgelm.quant.quality import val_sequences
    from transformers import AutoTokenizer

    at_start = qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "s", max_steps=1, lr=1e-9, ckpt_every=0))
    res = qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", max_steps=24, lr=1e-4, eval_every=12))
    before, after = at_start.manifest["quality"], read_manifest(res.student_dir)["quality"]
    assert after["kld"] < 0.75 * before["kld"], "KD on the grid brings the quantized model closer to its float self"
    assert after["top1_agree"] >= before["top1_agree"]
    assert [e["step"] for e in _evals(tmp_path / "r")] == [0, 12, 24]
    m = read_manifest(res.student_dir)
    assert m["kind"] == "quantized" and m["preset"]["name"] == "gptq-int4-g32-all"
    assert m["qat"]["tokens"] == 24 * 4 * 64 and m["qat"]["start"] is None and m["qat"]["scales"] == "weights"
    assert m["source"]["spec"] == str(tiny_q_model) and m["training"]["config"]["quant"] == "gptq-int4-g32-all"
    assert m["plan"]["summary"].startswith("15 x Q4_0,") and m["plan"]["predicted_kld"] is None
    assert 0 < m["quality"]["kld"] and m["quality"]["top1_agree"] <= 1
    _, _, qlinears = read_quantized(res.student_dir)
    assert {type(q.bits) for q in qlinears.values()} == {int} and "lm_head" in qlinears
    assert all(int(q.bits) == 4 and bool((q.zeros == 8).all()) for q in qlinears.values())
    # the checkpoint is the model QAT evaluated: the same val perplexity, from its codes alone
    tok = AutoTokenizer.from_pretrained(res.student_dir)
    seqs = val_sequences(tok, (str(tiny_corpus),), "text", 8, 64)
    again = score_lm(load_quantized_model(res.student_dir), seqs, batch_size=4)
    assert again.nll == pytest.approx(res.val_student.nll, rel=1e-6, abs=1e-6)


def test_qat_from_a_gptq_start_begins_at_its_values(tiny_q_model, tiny_corpus, quantized, tmp_path):
    from edgelm.metrics import score_lm
    from edgelm.models.qformat import load_quantized_model
    from edgelm.quant.quality import val_sequences
    from transformers import AutoTokenizer

    start, _ = quantized("gptq-int4-g32-all")
    res = qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", start=str(start), max_steps=4, eval_every=0,
                      scales="learned"))
    tok = AutoTokenizer.from_pretrained(start)
    gptq = score_lm(load_quantized_model(start), val_sequences(tok, (str(tiny_corpus),), "text", 8, 64), batch_size=4)
    first = _evals(tmp_path / "r")[0]
    assert first["step"] == 0 and first["val_nll"] == pytest.approx(gptq.nll, rel=1e-6)
    m = read_manifest(res.student_dir)
    assert m["qat"]["start"] == str(start) and m["qat"]["start_quality"]["kld"] > 0


def test_qat_kill_and_resume_gives_the_same_codes(tiny_q_model, tiny_corpus, tmp_path):
    full = qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "full"))
    args = _cli_args({k: v for k, v in _args(tiny_q_model, tiny_corpus, tmp_path / "killed").items() if k != "model"})
    kill_when(["qat", str(tiny_q_model), *args], tmp_path / "killed" / "checkpoints" / "step-0000004")
    r = run_cli("qat", str(tiny_q_model), *args, "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(full.student_dir / "model.safetensors")
    b = load_file(tmp_path / "killed" / "quantized" / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r = run_cli("qat", str(tiny_q_model), *args, "--resume", "--lr", "0.002")
    assert r.returncode == 2 and "different config (lr: 0.001 -> 0.002)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kw, error", [
    (dict(quant="llamacpp-q4_k_m"), "QAT trains onto edgelm's 32-wide block grids, which llamacpp-q4_k_m"),
    (dict(quant="int4-g128"), "int4-g128 has groups of 128 columns, which no ggml block type holds"),
    (dict(quant="int8"), "int8 has groups of -1 columns"),
    (dict(quant="fp16"), "which fp16 (cast) does not use"),
    (dict(quant="gptq-mixed"), "gptq-mixed picks a type per tensor from measured sensitivity: quantize first"),
    (dict(scales="minmax"), "--scales must be weights or learned"),
    (dict(fsdp=True), "QAT runs under DDP, not FSDP"),
])
def test_a_preset_qat_cannot_train_onto_is_refused_before_training(tiny_q_model, tiny_corpus, tmp_path, kw, error):
    with pytest.raises(EdgelmError, match=error.replace("(", r"\(").replace(")", r"\)")):
        qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", **kw))
    assert not (tmp_path / "r").exists()


def test_a_start_on_another_grid_is_refused(tiny_q_model, tiny_teacher, tiny_corpus, quantized, tmp_path):
    start, _ = quantized("gptq-int4-g32")
    with pytest.raises(EdgelmError, match="was quantized with gptq-int4-g32, whose grid is not gptq-int4-g32-all's"):
        qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", start=str(start)))
    with pytest.raises(EdgelmError, match="was quantized from .*, not "):
        qat(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", start=str(start), quant="gptq-int4-g32"))
    with pytest.raises(EdgelmError, match="is not an `edgelm quantize` folder"):
        qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", start=str(tiny_q_model)))
    assert not (tmp_path / "r").exists()
    r = run_cli("qat", str(tiny_q_model), "--start", str(start), "--max-steps", "2", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgelm: error: --start ")


def test_a_diverging_qat_keeps_the_last_good_checkpoint(tiny_q_model, tiny_corpus, tmp_path):
    from edgelm.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"the last good checkpoint is .*step-\d{7}"):
        qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", max_steps=40, lr=1e7, warmup_steps=0, grad_clip=0,
                    ckpt_every=1, eval_every=0, loss="reverse_kl"))
    assert not (tmp_path / "r" / "quantized").exists()
    state = torch.load(sorted((tmp_path / "r" / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_q_model, tiny_corpus):
    return qat(**_args(tiny_q_model, tiny_corpus, tmp_path_factory.mktemp("qat") / "r", lr=1e-4, ckpt_every=0))


@pytest.mark.parametrize("target", ["gguf", "onnx", "tvm"])
def test_the_qat_checkpoint_exports_exactly(target, qat_run, tiny_corpus, tmp_path):
    from edgelm.artifact.api import export
    from edgelm.artifact.check import READ_BACK_RTOL
    from edgelm.registry import TARGETS

    res = export(model=qat_run.student_dir, target=target, quant="gptq-int4-g32-all", out=tmp_path / "a",
                 data=(str(tiny_corpus),), eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)
    par = res.manifest["parity"]
    ex = par["exact"]  # the artifact against the QAT checkpoint's dequantized codes
    assert par["passed"] and ex["greedy_identical"] + ex["greedy_ties"] == ex["greedy_prompts"] == 2
    assert par["read_back"]["tensors"] > 0 and par["read_back"]["max_rel_weight_diff"] <= READ_BACK_RTOL
    assert ex["logit_atol"] == TARGETS.get(target).exact_atol
    assert res.manifest["source"]["quantized_folder"] == str(qat_run.student_dir.resolve())
    if target != "gguf":
        return
    import gguf

    from edgelm.converters.gguf import NameMap
    from edgelm.converters.source import read_source
    from edgelm.models.archs import get_arch

    src = read_source(qat_run.student_dir)
    arch = get_arch(src.config["model_type"])
    names = NameMap(arch, src.config["num_hidden_layers"])
    r = gguf.GGUFReader(str(tmp_path / "a" / res.manifest["file"]))
    got = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in r.tensors}
    assert got["token_embd.weight"][0] == "Q4_0"  # the tied embedding is the lm_head's codes
    assert np.array_equal(got["token_embd.weight"][1], src.qlinears["lm_head"].dequantize().numpy())
    for name, ql in src.qlinears.items():
        if name == "lm_head":
            continue
        gname = names(name + ".weight")
        ref = arch.permute_rows(ql.dequantize().numpy(), gname, src.config["num_attention_heads"],
                                src.config["num_key_value_heads"])
        assert got[gname][0] == "Q4_0" and np.array_equal(got[gname][1], ref), f"{gname}: not the QAT codes"


def test_qat_keeps_a_mixed_starts_types(tiny_q_model, tiny_corpus, quantized, tmp_path):
    start, _ = quantized("gptq-mixed")
    res = qat(**_args(tiny_q_model, tiny_corpus, tmp_path / "r", start=str(start), quant="gptq-mixed", max_steps=2,
                      eval_every=0, ckpt_every=0))
    planned = read_manifest(start)["plan"]["tensors"]
    m = read_manifest(res.student_dir)
    assert {n: t["type"] for n, t in m["plan"]["tensors"].items()} == {n: t["type"] for n, t in planned.items()}
    assert m["preset"] == read_manifest(start)["preset"]  # export takes it with the start's --quant
    assert len({t["type"] for t in planned.values()}) > 1, "the tiny model's plan mixes types"
