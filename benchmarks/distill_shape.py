"""The student's shape: depth, width (Minitron style) or both, pruned to about the same parameter count and distilled
on the same tokens (writes the `distill_shape` section of docs/results.md and docs/distill_shape.png).

    python benchmarks/distill_shape.py [--max-tokens 60000]

Depth keeps the most influential blocks at the teacher's width; width keeps every block and prunes the hidden
channels, query heads and MLP neurons by their activations; both does some of each. Each is scored on val during
training and on test at the end, beside the pruned model before any training.
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

# name -> pruned shape (70-71.5M parameters each, against the teacher's 134.5M). Hidden 512 would suit K-quants, but
# transformers wants the hidden size divisible by the query heads, and SmolLM2's 3 KV groups allow 3, 6 or 9 heads.
SHAPES = {
    "depth: 16 of 30 blocks, hidden 576, 9 heads, MLP 1024": dict(layers=16, intermediate_size=1024),
    "width: 30 blocks, hidden 576, 6 heads, MLP 448": dict(heads=6, intermediate_size=448),
    "width + channels: 30 blocks, hidden 480, 6 heads, MLP 704": dict(hidden_size=480, heads=6,
                                                                       intermediate_size=704),
    "both: 20 blocks, hidden 576, 6 heads, MLP 832": dict(layers=20, heads=6, intermediate_size=832),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=60_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--test-seqs", type=int, default=64)
    p.add_argument("--only", nargs="*", default=None, help="run only the shapes whose name starts with these")
    p.add_argument("--out", default="runs/bench-shape")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    rows, series = [], {}
    for name, shape in SHAPES.items():
        if a.only and not any(name.startswith(o) for o in a.only):
            continue
        tag = name.split(":")[0].replace(" + ", "-")
        logging.info("== %s", name)
        done = (Path(a.out) / tag / "student" / "edgelm.json").exists()  # a finished run with these flags is reused
        res = distill(teacher=a.teacher, max_tokens=a.max_tokens, seq_len=a.seq_len, batch_size=a.batch_size,
                      lr=a.lr, eval_every=a.eval_every, ckpt_every=0, out=f"{a.out}/{tag}", resume=done,
                      force=not done, **shape)
        wall = res.manifest["training"]["wall_s_this_process"]
        test = evaluate(str(res.student_dir), split="test", seq_len=a.seq_len, max_seqs=a.test_seqs)
        recs = read_metrics(res.metrics_path)
        series[name] = recs
        start = next(r for r in recs if r.get("event") == "eval")
        tok_s = sorted(r["tok_s"] for r in recs if r.get("event") == "train")
        rows.append([name, res.manifest["student"]["params"] / 1e6, start["val_ppl"], res.val_student.ppl,
                     test.score.ppl, test.score.top1, tok_s[len(tok_s) // 2], wall / 60])
    teacher_val = res.val_teacher
    docs = Path(a.docs)
    plot_curves(series, "val_ppl", docs / "distill_shape.png", ylabel="val perplexity",
                hline=("teacher", teacher_val.ppl), logy=True)
    cmd = "python benchmarks/distill_shape.py " + shlex.join(sys.argv[1:])
    body = f"""## The student's shape: depth against width at equal parameters and tokens (`benchmarks/distill_shape.py`)

Command: `{cmd.strip()}` on {platform.machine()}, {(time.perf_counter() - t0) / 60:.0f} min in all. Teacher
`{a.teacher}` (134.5M parameters, val ppl {teacher_val.ppl:.2f}); {a.max_tokens:,} training tokens each, batch
{a.batch_size} x {a.seq_len}, peak lr {a.lr}, forward KL; test = {a.test_seqs} sequences of {a.seq_len} tokens.

{md_table(["shape", "params (M)", "val ppl, pruned", "val ppl, distilled", "test ppl", "test top-1",
           "train tok/s (median)", "training wall (min)"], rows)}
![val perplexity by shape](distill_shape.png)
"""
    update_section(docs / "results.md", "distill_shape", body)
    logging.info("wrote %s", docs / "results.md")


if __name__ == "__main__":
    main()
