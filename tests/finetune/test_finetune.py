"""`edgelm finetune`: LoRA trains only the adapter into a PEFT folder bound to its base, resumes bit-identically,
and refuses what doesn't fit in one line."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from edgelm.errors import EdgelmError
from edgelm.finetune.api import finetune
from edgelm.manifest import read_manifest
from tests.conftest import kill_when, run_cli
from tests.distill.test_trainer import _cli_args
from tests.finetune.conftest import ft_args


def test_lora_trains_the_adapter_only_and_peft_loads_it(lora_run, tiny_teacher):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgelm.finetune.adapter import merged_model, read_adapter
    from edgelm.models.loader import resolve

    m = read_manifest(lora_run.student_dir)
    f = m["finetune"]
    assert m["kind"] == "adapter" and lora_run.student_dir.name == "adapter"
    assert m["base"]["sha256"] == resolve(tiny_teacher).sha256 and m["base"]["spec"] == str(tiny_teacher)
    assert f["method"] == "lora" and f["rank"] == 4 and f["tokens"] == 32 * 4 * 64
    assert f["val_ppl_after"] < 0.99 * f["val_ppl_before"], "the adapter learns the new domain"
    assert f["val_ppl_before"] == pytest.approx(m["val"]["teacher"]["ppl"]), "no KD teacher: the base is the before"
    # 2 layers x 7 projections of the tiny Llama: A [4, in] and B [out, 4]
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    n_lora = sum(4 * (mod.in_features + mod.out_features) for n, mod in base.named_modules()
                 if n.rsplit(".", 1)[-1] in f["targets"])
    assert f["trainable_params"] == n_lora
    ad = read_adapter(lora_run.student_dir)
    assert len(ad.pairs) == 7 * base.config.num_hidden_layers and ad.rank == 4
    assert all(float(p.b.abs().max()) > 0 for p in ad.pairs), "every B moved from its zero init"
    # PEFT itself reads the folder, and its unmerged forward is edgelm's merged model
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_teacher), lora_run.student_dir).eval()
    merged, _, _ = merged_model(ad)
    ids = torch.arange(5, 40).unsqueeze(0)
    with torch.no_grad():
        a, b, c = peft(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-4) and (a - c).abs().max() > 0.1


def test_a_full_finetune_writes_a_model(tiny_teacher, tiny_domain, tmp_path):
    res = finetune(**ft_args(tiny_teacher, tiny_domain, tmp_path, full=True, max_steps=4, lr=1e-3, ckpt_every=0))
    m = read_manifest(res.student_dir)
    assert res.student_dir.name == "model" and m["kind"] == "student" and m["finetune"]["method"] == "full"
    a, b = load_file(res.student_dir / "model.safetensors"), load_file(tiny_teacher / "model.safetensors")
    assert a.keys() == b.keys() and all(not torch.equal(a[k], b[k]) for k in a if k.endswith("proj.weight"))
    assert m["finetune"]["trainable_params"] == sum(v.numel() for v in b.values())


def test_finetune_kill_and_resume_gives_the_same_adapter(tiny_teacher, tiny_domain, tmp_path):
    full = finetune(**ft_args(tiny_teacher, tiny_domain, tmp_path / "full", lr=3e-3))
    args = _cli_args({k: v for k, v in ft_args(tiny_teacher, tiny_domain, tmp_path / "killed", lr=3e-3).items()
                      if k != "model"})
    kill_when(["finetune", str(tiny_teacher), *args], tmp_path / "killed" / "checkpoints" / "step-0000004")
    r = run_cli("finetune", str(tiny_teacher), *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "val perplexity on the new domain" in r.stdout
    a = load_file(full.student_dir / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_manifest(tmp_path / "killed" / "adapter")["finetune"]["val_ppl_before"] == \
        full.manifest["finetune"]["val_ppl_before"], "the score before training survives the resume"


@pytest.mark.parametrize("kw, error", [
    (dict(targets=("q_proj", "qkv")), "--targets qkv: no such linear in the model's blocks; it has down_proj,"),
    (dict(rank=64), "--rank 64 is not below the narrowest adapted matrix side (32)"),
    (dict(rank=0), "--rank must be at least 1"),
    (dict(alpha=0.5), "--alpha 0.5 weighs KD from a teacher: add --teacher MODEL"),
    (dict(lora=True, full=True), "--lora and --full pick different runs"),
    (dict(fsdp=True), "LoRA runs under DDP, not FSDP"),
])
def test_what_lora_cannot_train_is_refused_in_one_line(tiny_teacher, tiny_domain, tmp_path, kw, error):
    with pytest.raises(EdgelmError, match=None) as e:
        finetune(**ft_args(tiny_teacher, tiny_domain, tmp_path, **kw))
    assert error in str(e.value)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoints").exists()


def test_the_cli_refuses_a_missing_target_without_a_traceback(tiny_teacher, tiny_domain, tmp_path):
    r = run_cli("finetune", str(tiny_teacher), "--data", str(tiny_domain), "--targets", "w_pack", "--max-steps", "2",
                "--out", str(tmp_path / "r"), "--no-progress")
    assert r.returncode != 0 and "--targets w_pack: no such linear" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "adapter").exists()


def test_lora_under_torchrun_matches_one_process(tiny_teacher, tiny_domain, tmp_path):
    """DDP on the CPU (gloo, 2 processes): the same global batch trains the same adapter."""
    import os
    import subprocess
    import sys

    single = finetune(**ft_args(tiny_teacher, tiny_domain, tmp_path / "single", max_steps=4, lr=3e-3, ckpt_every=0))
    args = _cli_args({k: v for k, v in ft_args(tiny_teacher, tiny_domain, tmp_path / "ddp", max_steps=4, lr=3e-3,
                                               ckpt_every=0, batch_size=2).items() if k != "model"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "edgelm", "finetune", str(tiny_teacher), *args], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_manifest(tmp_path / "ddp" / "adapter")
    assert m["training"]["world_size"] == 2 and m["finetune"]["tokens"] == single.manifest["finetune"]["tokens"]
    a = load_file(single.student_dir / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
