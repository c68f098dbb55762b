"""The teacher cache: written by the first run, read by the next over the same data (which then trains exactly as
the first did, without the teacher), recomputed where the data differ, refused where it can't serve."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from edgelm.distill.api import distill
from edgelm.errors import EdgelmError
from tests.conftest import run_cli
from tests.distill.test_trainer import _args

STEPS, BATCH = 12, 4  # _args' budget: 48 sequences


def _losses(run) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["event"] == "train"]


def test_a_second_run_reads_the_cache_and_trains_as_the_first(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    cache = tmp_path / "tc"
    first = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "a", teacher_cache=str(cache), cache_topk=8))
    assert first.manifest["training"]["teacher_cache"] == {"folder": str(cache), "topk": 8, "hits": 0,
                                                           "misses": STEPS * BATCH}
    meta = json.loads((cache / "meta.json").read_text())
    assert (meta["topk"], meta["seq_len"], meta["rows"]) == (8, 64, STEPS * BATCH)

    import edgelm.distill.tcache as tcache

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran although every sequence was cached")

    monkeypatch.setattr(tcache, "teacher_topk", no_teacher)
    second = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "b", teacher_cache=str(cache), cache_topk=8))
    assert second.manifest["training"]["teacher_cache"]["hits"] == STEPS * BATCH
    assert second.manifest["training"]["teacher_cache"]["misses"] == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    wa, wb = (load_file(r.student_dir / "model.safetensors") for r in (first, second))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    monkeypatch.undo()

    # other data order: every row is recomputed (ids differ); a longer run grows the cache
    other = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "c", teacher_cache=str(cache), cache_topk=8,
                            seed=1, max_steps=STEPS + 2))
    assert other.manifest["training"]["teacher_cache"]["misses"] == (STEPS + 2) * BATCH
    assert json.loads((cache / "meta.json").read_text())["rows"] == (STEPS + 2) * BATCH


def test_the_top_k_objective_learns_like_the_full_one(tiny_teacher, tiny_corpus, tmp_path):
    """KD over the teacher's top 64 words (of 512) plus one bucket trains to nearly the full loss's val ppl."""
    kw = dict(max_steps=30, eval_every=0, ckpt_every=0)
    full = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "full", **kw))
    top = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "top", teacher_cache=str(tmp_path / "tc"), **kw))
    start = json.loads((tmp_path / "top" / "metrics.jsonl").read_text().splitlines()[1])["val_ppl"]
    gain_full, gain_top = start - full.val_student.ppl, start - top.val_student.ppl
    assert gain_full > 0 and abs(gain_top / gain_full - 1) < 0.1, (start, top.val_student, full.val_student)


def test_a_cache_that_cannot_serve_is_refused(tiny_teacher, tiny_corpus, tmp_path):
    cache = tmp_path / "tc"
    distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "a", max_steps=2, teacher_cache=str(cache), cache_topk=8))
    with pytest.raises(EdgelmError, match=r"was written with topk 8 \(this run: 4\); pass another --teacher-cache"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "b", max_steps=2, teacher_cache=str(cache),
                        cache_topk=4))
    with pytest.raises(EdgelmError, match="is a folder with other files in it"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "c", max_steps=2, teacher_cache=str(tmp_path / "a")))
    with pytest.raises(EdgelmError, match="at most the vocabulary size 512, got 600"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "d", max_steps=2, teacher_cache=str(tmp_path / "t2"),
                        cache_topk=600))
    assert not any((tmp_path / d).exists() for d in ("b", "c", "d", "t2"))  # nothing left half-made


@pytest.mark.parametrize("flags, msg", [
    (["--loss", "jsd"], "jsd needs its whole distribution: use --loss forward_kl or drop --teacher-cache"),
    (["--kd-chunk", "0"], "--teacher-cache needs the fused loss: drop --kd-chunk 0"),
    (["--cache-topk", "0"], "--cache-topk must be at least 1, got 0"),
])
def test_bad_teacher_cache_flags_are_one_line(tiny_teacher, tiny_corpus, tmp_path, flags, msg):
    r = run_cli("distill", "--teacher", str(tiny_teacher), "--data", str(tiny_corpus), "--max-steps", "2",
                "--out", str(tmp_path / "r"), "--teacher-cache", str(tmp_path / "tc"), *flags)
    assert r.returncode != 0 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr
    assert not (tmp_path / "tc").exists() and not (tmp_path / "r").exists()
