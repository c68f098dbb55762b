"""Adapters as artifacts: GGUF LoRA for llama.cpp checked against PyTorch, bound to their base, switched per call
without reloading the base; merged into full artifacts where a runtime can't apply them."""
from __future__ import annotations

import pytest

from edgelm.errors import EdgelmError
from edgelm.manifest import read_manifest
from tests.conftest import run_cli

from tests.finetune.conftest import CHECK


def test_a_gguf_adapter_passes_its_check_and_is_bound_to_its_base(gguf_adapter, gguf_base):
    from gguf import GGUFReader

    out, res = gguf_adapter
    m = read_manifest(out)
    assert m["kind"] == "adapter-gguf" and res.preset == "adapter" and m["parity"]["passed"]
    p = m["parity"]
    # the runtime applies the adapter as PyTorch does: its error no more than the base's own, and far below the
    # adapter's own effect (a check of an adapter that changes nothing would check nothing)
    assert p["kld"] <= p["max_kld"] and p["adapter_effect_kld"] > 20 * max(p["kld"], 1e-4)
    assert p["greedy_identical"] + p["greedy_ties"] == p["greedy_prompts"]
    r = GGUFReader(str(out / "adapter.gguf"))
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(r.fields["adapter.type"].parts[-1]).decode() == "lora"
    assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == pytest.approx(8.0)  # scaling 2 x rank 4
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.3.ffn_down.weight.lora_b" in names and len(names) == 56
    assert m["base"]["sha256"] == read_manifest(gguf_base)["files"]["model.gguf"]["sha256"]
    assert 0 < m["share_of_base_bytes"] < 0.2


def test_load_switches_adapters_per_call_without_reloading_the_base(gguf_adapter, gguf_base, lora_run):
    import torch

    from edgelm.finetune.adapter import merged_model, read_adapter
    from edgelm.runtimes.api import load

    out, _ = gguf_adapter
    merged, tok, _ = merged_model(read_adapter(lora_run.student_dir))
    ids = tok("def add(a, b):\n    return", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = merged.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids):]
    with load(gguf_base, threads=1, adapters={"numpy": out}) as rt:
        llm = rt.llm
        base = rt.greedy(ids, 8)
        rt.set_adapter("numpy")
        adapted = rt.greedy(ids, 8)
        rt.set_adapter(None)
        again = rt.greedy(ids, 8)
        assert rt.llm is llm, "the base stays loaded"
        with pytest.raises(EdgelmError, match="no adapter named 'math' is loaded; loaded: numpy"):
            rt.set_adapter("math")
    assert adapted == want.tolist() and base == again and adapted != base


def test_an_adapter_for_another_base_is_refused(gguf_adapter, lora_run, tiny_q_model, tiny_corpus, tmp_path):
    from edgelm.artifact.api import export
    from edgelm.runtimes.api import load

    other = tmp_path / "other"
    export(model=str(tiny_q_model), target="gguf", quant="fp32", out=other, data=(str(tiny_corpus),), **CHECK)
    with pytest.raises(EdgelmError, match="was exported for the base .* not for"):
        load(other, adapters={"numpy": gguf_adapter[0]})
    r = run_cli("chat", str(other), "--adapter", str(gguf_adapter[0]), "--threads", "1")
    assert r.returncode != 0 and "was exported for the base" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", str(lora_run.student_dir), "--base", str(other), "--out", str(tmp_path / "a"))
    assert r.returncode != 0 and "was trained on" in r.stderr and "export the adapter against an artifact of its " \
        "own base" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()


def test_bad_adapter_exports_are_one_line(gguf_adapter, lora_run, gguf_base, tiny_teacher, tmp_path):
    from edgelm.artifact.api import export

    r = run_cli("export", str(lora_run.student_dir), "--out", str(tmp_path / "a"))
    assert r.returncode != 0 and "is a LoRA adapter: pass --base" in r.stderr and "Traceback" not in r.stderr
    cases = [
        (dict(model=str(gguf_adapter[0]), merge=True, target="tvm"), "is an exported gguf adapter, which llamacpp "
         "applies unmerged"),
        (dict(model=str(lora_run.student_dir), merge=True, base=str(gguf_base)), "pass one of them"),
        (dict(model=str(tiny_teacher), merge=True), "--merge applies to a LoRA adapter"),
    ]
    for kw, error in cases:
        with pytest.raises(EdgelmError) as e:
            export(out=str(tmp_path / "a"), **kw)
        assert error in str(e.value), kw
    assert not (tmp_path / "a").exists()


def test_merge_bakes_the_adapter_into_a_tvm_artifact(lora_run, tiny_domain, tmp_path):
    from edgelm.artifact.api import export

    pytest.importorskip("tvm")
    res = export(model=str(lora_run.student_dir), merge=True, target="tvm", quant="fp32", out=tmp_path / "tvm",
                 data=(str(tiny_domain),), **CHECK)
    m = read_manifest(res.out)
    assert m["kind"] == "export-tvm" and m["parity"]["passed"]
    assert m["source"]["merged"]["adapter"] == str(lora_run.student_dir)


def test_an_onnx_adapter_applies_over_an_adapter_ready_base(onnx_base, lora_run, tiny_domain, tmp_path):
    from edgelm.artifact.api import export
    from edgelm.runtimes.api import load

    bm = read_manifest(onnx_base)
    assert bm["lora_slots"]["inputs"] == 2 * 7 * 4 and bm["parity"]["passed"], "zero adapters: the base is exact"
    res = export(model=str(lora_run.student_dir), base=str(onnx_base), out=tmp_path / "a", data=(str(tiny_domain),),
                 **CHECK)
    p = res.manifest["parity"]
    assert res.manifest["kind"] == "adapter-onnx" and p["passed"]
    assert (tmp_path / "a" / "adapter.onnx_adapter").is_file()
    assert p["greedy_identical"] == p["greedy_prompts"] and p["max_abs_logit_diff"] < 1e-3
    assert p["adapter_effect_kld"] > 1000 * max(p["kld"], 1e-7)
    with load(onnx_base, threads=1, adapters={"numpy": tmp_path / "a"}) as rt:
        ids = rt.encode("import numpy as np\n")
        base = rt.greedy(ids, 8)
        rt.set_adapter("numpy")
        adapted, logits = rt.greedy(ids, 8), rt.logits(ids)
        rt.set_adapter(None)
        assert rt.greedy(ids, 8) == base and adapted != base
        assert int(logits[-1].argmax()) == adapted[0], "the session's logits and genai's loop run the same adapter"


def test_onnx_adapters_need_an_adapter_ready_float_base(lora_run, tiny_teacher, tiny_domain, tmp_path):
    from edgelm.artifact.api import export

    plain = tmp_path / "plain"
    export(model=str(tiny_teacher), target="onnx", quant="fp32", out=plain, data=(str(tiny_domain),), **CHECK)
    with pytest.raises(EdgelmError, match="has no LoRA inputs; export it with --lora-like"):
        export(model=str(lora_run.student_dir), base=str(plain), out=tmp_path / "a", data=(str(tiny_domain),))
    assert not (tmp_path / "a").exists()
    with pytest.raises(EdgelmError, match="--lora-like needs a float ONNX base"):
        export(model=str(tiny_teacher), target="onnx", quant="int4-g32", out=tmp_path / "b",
               lora_like=str(lora_run.student_dir))
    with pytest.raises(EdgelmError, match="--lora-like gives an ONNX base LoRA inputs; gguf artifacts take GGUF"):
        export(model=str(tiny_teacher), target="gguf", quant="fp32", out=tmp_path / "b",
               lora_like=str(lora_run.student_dir))
