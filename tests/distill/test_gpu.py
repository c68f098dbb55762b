"""Distillation on CUDA (bf16 autocast). Skipped on machines without a GPU."""
from __future__ import annotations

import json

import pytest

from edgelm.distill.api import distill
from tests.distill.test_trainer import _args

pytestmark = pytest.mark.gpu


def test_distill_on_cuda(tiny_teacher, tiny_corpus, tmp_path):
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "gpu", device="cuda", max_steps=8, threads=None))
    assert res.manifest["training"]["device"] == "cuda"
    recs = [json.loads(ln) for ln in res.metrics_path.read_text().splitlines()]
    first = next(r for r in recs if r["event"] == "eval")
    assert res.val_student.ppl < first["val_ppl"]
    assert all(0 < r["mfu"] < 1 for r in recs if r["event"] == "train")
