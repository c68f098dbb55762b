"""Distillation quality at equal tokens on the embedded default (writes docs/results.md and docs/*.png).

    python benchmarks/distill_quality.py [--max-tokens 64000] [--layers 16] [--intermediate-size 1024]

Compares, with the same student shape, data order and token budget:
  (a) KD from a pruned init, (b) KD from a random init, (c) cross-entropy only from a pruned init,
and reports the teacher's own figures on the same val and test sequences.
"""
from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.distill.api import distill, evaluate
from edgelm.report import md_table, plot_curves, read_metrics, update_section

RUNS = {
    "(a) KD, pruned init": dict(alpha=1.0, init="prune"),
    "(b) KD, random init": dict(alpha=1.0, init="random"),
    "(c) CE only, pruned init": dict(alpha=0.0, init="prune"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=64_000)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--test-seqs", type=int, default=64)
    p.add_argument("--out", default="runs/bench-distill")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    results, series = {}, {}
    for name, kw in RUNS.items():
        logging.info("== %s", name)
        tag = name.split(")")[0].strip("(")
        res = distill(teacher=a.teacher, layers=a.layers, intermediate_size=a.intermediate_size, max_tokens=a.max_tokens,
                      seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, ckpt_every=0,
                      out=f"{a.out}/{tag}", force=True, **kw)
        test = evaluate(str(res.student_dir), split="test", seq_len=a.seq_len, max_seqs=a.test_seqs)
        results[name] = (res, test)
        series[name] = read_metrics(res.metrics_path)
    teacher_test = evaluate(a.teacher, split="test", seq_len=a.seq_len, max_seqs=a.test_seqs)
    teacher_val = next(iter(results.values()))[0].val_teacher

    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    plot_curves(series, "val_ppl", docs / "distill_quality_ppl.png", ylabel="val perplexity",
                hline=("teacher", teacher_val.ppl), logy=True)
    plot_curves(series, "val_top1", docs / "distill_quality_top1.png", ylabel="val next-token top-1",
                hline=("teacher", teacher_val.top1))
    rows = [["teacher (30 layers)", "-", teacher_val.ppl, teacher_val.top1, teacher_test.score.ppl, teacher_test.score.top1]]
    for name, (res, test) in results.items():
        rows.append([name, res.tokens_seen, res.val_student.ppl, res.val_student.top1, test.score.ppl, test.score.top1])
    # val ppl at each eval point, per run
    evals = {n: {r["tokens"]: r["val_ppl"] for r in recs if r.get("event") == "eval"} for n, recs in series.items()}
    points = sorted(set.intersection(*(set(e) for e in evals.values())))
    curve = [[t, *(evals[n][t] for n in RUNS)] for t in points]
    cmd = "python benchmarks/distill_quality.py " + shlex.join(sys.argv[1:])
    body = f"""## Distillation quality at equal tokens (`benchmarks/distill_quality.py`)

Command: `{cmd.strip()}` on {platform.machine()}, {platform.processor() or 'CPU'}, torch default threads,
{(time.perf_counter() - t0) / 60:.0f} min in all. Teacher `{a.teacher}`; student {a.layers} layers, MLP width
{a.intermediate_size}; {a.max_tokens:,} training tokens each, batch {a.batch_size} x {a.seq_len}, peak lr {a.lr};
stdlib corpus; val = {results[next(iter(RUNS))][0].manifest['val']['seqs']} and test = {a.test_seqs} sequences of {a.seq_len} tokens,
one window per file first (`eval_sequences`), from files no training sequence comes from.

{md_table(["model", "tokens seen", "val ppl", "val top-1", "test ppl", "test top-1"], rows)}
Val perplexity against tokens seen:

{md_table(["tokens", *RUNS], curve)}
![val perplexity](distill_quality_ppl.png)
![val top-1](distill_quality_top1.png)
"""
    update_section(docs / "results.md", "distill_quality", body)
    logging.info("wrote %s", docs / "results.md")


if __name__ == "__main__":
    main()
