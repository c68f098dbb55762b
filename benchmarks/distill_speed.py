"""Distillation throughput on this machine: each trainer option's share of tok/s, peak memory and val perplexity
after equal tokens (writes the `distill_speed` section of docs/results.md).

    python benchmarks/distill_speed.py [--max-tokens 16384] [--only before fused cache-write cache-read]

Every variant runs the demo's KD step (the 30-layer teacher's forward; a 16-layer student's forward, backward and
AdamW; forward KL over the 49,152-word vocabulary) in its own process, on the same data order and tokens. tok/s is the
median over steps after the first two (warm-up, compilation).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CACHE = "<out>/tcache"  # the teacher cache's folder under --out, emptied before the variant that writes it
# id -> (name, DistillConfig overrides); the first is the baseline (the trainer before the fused loss and bf16)
VARIANTS = {
    "before": ("fp32, whole [B, T, V] logits (before)", dict(bf16="off", kd_chunk=0)),
    "fused": ("fp32, fused lm_head + loss in chunks of 256", dict(bf16="off", kd_chunk=256)),
    "compile": ("fp32, fused, torch.compile", dict(bf16="off", kd_chunk=256, compile=True)),
    "bf16": ("bf16 autocast + bf16 teacher, whole logits", dict(bf16="on", kd_chunk=0)),
    "bf16-fused": ("bf16 autocast + bf16 teacher, fused", dict(bf16="on", kd_chunk=256)),
    "default": ("default (--bf16 auto, fused)", dict()),
    # the teacher cache: the first run writes it (and trains on the same top-k objective), the next one only reads
    "cache-write": ("fp32, fused, --teacher-cache: the run that writes it", dict(bf16="off", teacher_cache=CACHE)),
    "cache-read": ("fp32, fused, --teacher-cache: a later run that reads it", dict(bf16="off", teacher_cache=CACHE)),
    # the default precision on the same cache: no teacher forward, the student's work in bf16 where that is faster
    "default-cache-read": ("default (--bf16 auto, fused), --teacher-cache: a later run that reads it",
                           dict(teacher_cache=CACHE)),
}


def child(kw: dict, result: Path) -> None:
    from edgelm.distill.api import distill
    from edgelm.metrics import peak_rss_bytes

    res = distill(**kw)
    recs = [json.loads(ln) for ln in res.metrics_path.read_text().splitlines()]
    tok_s = [r["tok_s"] for r in recs if r["event"] == "train"][2:]
    t = res.manifest["training"]
    result.write_text(json.dumps({
        "tok_s": statistics.median(tok_s), "val_ppl": res.val_student.ppl, "precision": t["precision"],
        "reason": t["precision_reason"], "bf16_speedup": t["bf16_speedup"],
        "max_rss_gib": peak_rss_bytes() / 2**30,
    }))


def breakdown(kw: dict, result: Path) -> None:
    """Seconds per phase of one fp32 step (best of 3): where the time goes."""
    import torch

    from edgelm.distill.losses import chunked_head_loss
    from edgelm.metrics import train_flops_per_token
    from edgelm.models.loader import load_model
    from edgelm.models.prune import count_params, prune
    from edgelm.registry import KD_LOSSES

    teacher, _, _ = load_model(kw["teacher"])
    t_cfg = teacher.config
    # the student's shape with the first blocks and MLP neurons: the timings depend on shapes only
    student = prune(teacher, list(range(kw["layers"])), kw["intermediate_size"],
                    [torch.arange(t_cfg.intermediate_size, 0, -1.0) for _ in range(t_cfg.num_hidden_layers)]).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, t_cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))  # [B, T]
    targets = ids[:, 1:].reshape(-1)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        h_t = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, t_cfg.hidden_size)
    w, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight

    def body():
        return student.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, t_cfg.hidden_size)

    def head_loss(h):
        return chunked_head_loss(h, w, h_t, w_t, targets, KD_LOSSES.get("forward_kl"), alpha=1.0, chunk=256)[0]

    def whole():
        head_loss(body()).backward()

    with torch.no_grad():
        t_body = best(lambda: teacher.base_model(input_ids=ids))
    s_fwd = best(body)
    s_head = best(lambda: head_loss(body().detach().requires_grad_())) - s_fwd
    s_all = best(whole)
    phases = {"teacher forward (30 blocks)": t_body, "student forward (blocks)": s_fwd,
              "lm_heads + KD loss, forward and backward": s_head,
              "student backward (blocks)": s_all - s_fwd - s_head, "AdamW step": best(opt.step)}
    flops = train_flops_per_token(count_params(student), count_params(teacher)) * ids.numel()
    result.write_text(json.dumps({"phases": phases, "step_flops": flops}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=16_384)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--eval-seqs", type=int, default=16)
    p.add_argument("--cache-topk", type=int, default=None,
                   help="teacher words kept per position in the cache variants (default: the trainer's)")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="variants to run; the others' rows come from their last run under --out, marked so")
    p.add_argument("--out", default="runs/bench-speed")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--breakdown", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cache_topk is None:
        from edgelm.distill.config import DistillConfig

        a.cache_topk = DistillConfig.cache_topk
    if a.child:
        return child(json.loads(a.child), Path(a.result))
    if a.breakdown:
        return breakdown(json.loads(a.breakdown), Path(a.result))

    from edgelm.bench.api import machine_info
    from edgelm.report import md_table, update_section

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    reads = {"cache-read", "default-cache-read"} & set(a.only)
    if reads and "cache-write" not in a.only and not (out / "tcache" / "meta.json").is_file():
        sys.exit("distill_speed: cache-read needs the cache that cache-write leaves under --out; run both")
    if "cache-write" in a.only:
        shutil.rmtree(out / "tcache", ignore_errors=True)
    earlier = []  # variants whose row comes from an earlier invocation
    for vid, (name, over) in VARIANTS.items():
        result = out / f"{vid}.json"
        if vid not in a.only:
            if result.is_file():
                results[name] = json.loads(result.read_text())
                earlier.append(name)
            continue
        logging.info("== %s", name)
        over = {k: v.replace("<out>", str(out)) if isinstance(v, str) else v for k, v in over.items()}
        if "teacher_cache" in over:
            over["cache_topk"] = a.cache_topk
        kw = dict(teacher=a.teacher, layers=a.layers, intermediate_size=a.intermediate_size, max_tokens=a.max_tokens,
                  eval_every=0, ckpt_every=0, eval_seqs=a.eval_seqs, out=str(out / vid), force=True,
                  progress=False, **over)
        subprocess.run([sys.executable, __file__, "--child", json.dumps(kw), "--result", str(result)], check=True)
        results[name] = json.loads(result.read_text())
    shape = dict(teacher=a.teacher, layers=a.layers, intermediate_size=a.intermediate_size)
    if "fused" in a.only or not (out / "phases.json").is_file():
        subprocess.run([sys.executable, __file__, "--breakdown", json.dumps(shape), "--result",
                        str(out / "phases.json")], check=True)
    phases = json.loads((out / "phases.json").read_text())
    step = sum(phases["phases"].values())
    prow = [[k, v, 100 * v / step] for k, v in phases["phases"].items()] + [["one step (sum)", step, 100.0]]
    base = results.get(VARIANTS["before"][0])
    if base is None:
        sys.exit("distill_speed: no baseline row; run with --only before ...")
    rows = [[name + (" *" if name in earlier else ""), r["precision"], r["tok_s"], r["tok_s"] / base["tok_s"],
             r["max_rss_gib"], r["val_ppl"], 100 * (r["val_ppl"] / base["val_ppl"] - 1)] for name, r in results.items()]
    star = ("\n\\* from an earlier invocation of this benchmark (same flags); the rest ran together in this one, and "
            "this VM's speed drifts between sessions.\n" if earlier else "")
    auto = results.get(VARIANTS["default"][0], {"precision": "not measured", "reason": "--only left it out"})
    cmd = "python benchmarks/distill_speed.py " + shlex.join(sys.argv[1:])
    body = f"""## Distillation throughput (`benchmarks/distill_speed.py`)

Command: `{cmd.strip()}` on {platform.machine()} ({machine_info()['cpu']}), torch's default threads,
{(time.perf_counter() - t0) / 60:.0f} min in all. The demo's step: teacher `{a.teacher}` (30 blocks), student
{a.layers} blocks with MLP {a.intermediate_size}, batch 4 x 256, forward KL; {a.max_tokens:,} tokens per variant, each
in its own process; val perplexity on {a.eval_seqs} sequences after those tokens; the teacher cache keeps the top
{a.cache_topk} words per position. What `--bf16 auto` decided here:
{auto['precision']} ({auto['reason']}).

{md_table(["variant", "precision", "tok/s", "x before", "peak RSS (GiB)", "val ppl", "val ppl vs before (%)"],
          rows)}{star}
Where one fp32 step of 4 x 256 tokens goes (fused loss, best of 3 per phase):

{md_table(["phase", "seconds", "share (%)"], prow)}
That step is {phases['step_flops'] / 1e9:,.0f} GFLOP (6 x student params + 2 x teacher params per token), so
{phases['step_flops'] / step / 1e9:,.0f} GFLOP/s.
"""
    update_section(Path(a.docs) / "results.md", "distill_speed", body)
    logging.info("wrote %s", Path(a.docs) / "results.md")


if __name__ == "__main__":
    main()
