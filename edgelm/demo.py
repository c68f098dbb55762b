"""`edgelm demo`: the main job on the embedded default. Prunes SmolLM2-135M-Instruct into a student, distills it
on the stdlib's source, evaluates both on the test split, and writes a report with tables and plots.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # run folder; the report is out/report.md
    teacher: str = "smollm2-135m-instruct"  # any teacher `edgelm distill` accepts
    layers: int = 16  # decoder blocks kept of the teacher's 30, by block importance
    intermediate_size: int = 1024  # MLP width kept of the teacher's 1536 (multiple of 256)
    max_tokens: int = 100_000  # training budget in tokens (sized for ~12 min on 2 CPU cores)
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 4  # sequences per step
    lr: float = 5e-4  # peak learning rate
    eval_every: int = 25  # steps between val evaluations
    test_seqs: int = 64  # test-split sequences for the final comparison (one per file first)
    threads: int | None = None  # CPU threads (default: torch's)
    resume: bool = False  # continue an interrupted demo instead of starting over
    progress: bool = True  # progress bars


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from edgelm.api import distill, evaluate
    from edgelm.distill.config import DistillConfig
    from edgelm.report import write_distill_report

    t0 = time.perf_counter()
    out = Path(cfg.out)
    log.info("[1/3] distill: %s -> %d layers, MLP %d, %s tokens", cfg.teacher, cfg.layers, cfg.intermediate_size,
             f"{cfg.max_tokens:,}")
    dcfg = DistillConfig(
        teacher=cfg.teacher, layers=cfg.layers, intermediate_size=cfg.intermediate_size, max_tokens=cfg.max_tokens,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=cfg.eval_every, ckpt_every=cfg.eval_every * 2,
        out=str(out), threads=cfg.threads, resume=cfg.resume, force=not cfg.resume, progress=cfg.progress,
    )
    res = distill(dcfg)
    log.info("[2/3] evaluate teacher and student on the test split (%d x %d tokens)", cfg.test_seqs, cfg.seq_len)
    test = {
        name: evaluate(model, split="test", seq_len=cfg.seq_len, max_seqs=cfg.test_seqs, batch_size=cfg.batch_size,
                       threads=cfg.threads)
        for name, model in (("teacher", cfg.teacher), ("student", str(res.student_dir)))
    }
    log.info("[3/3] report")
    report = write_distill_report(out, res, test, wall_s=time.perf_counter() - t0)
    return {"student": str(res.student_dir), "report": str(report), "test": {k: v.as_dict() for k, v in test.items()}}
