"""A long distillation on this machine, its scaling curve, and the Pareto table of students against the teacher
quantized harder (writes the `distill_scale` section of docs/results.md, docs/distill_scale.png and
docs/distill_pareto.png).

    python benchmarks/distill_scale.py --max-tokens 2000000            # hours on 2 CPU cores; Ctrl-C is safe
    python benchmarks/distill_scale.py --max-tokens 2000000 --resume   # continue it from its last checkpoint

Training scores val and test sequences at every evaluation; the trainer's progress bar shows the ETA. The test
perplexity curve is fitted with a power law (floor + scale * tokens^-exponent), which says how many tokens the
student would need to reach the teacher Q4_0's test perplexity. The Pareto table exports the teacher at fp32, Q8_0,
Q4_K_M, Q4_0 and Q2_K and the student at fp32, GPTQ Q4_0 and llama.cpp Q4_K_M, all GGUF, and measures each in its
own llama.cpp process (`edgelm bench`, 1 thread): test perplexity and top-1, MiB and decode tok/s.
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TEACHER_PRESETS = ["fp32", "llamacpp-q8_0", "llamacpp-q4_k_m", "llamacpp-q4_0", "llamacpp-q2_k"]
STUDENT_PRESETS = ["fp32", "gptq-int4-g32", "llamacpp-q4_k_m"]
TARGET = ("teacher", "llamacpp-q4_0")  # the artifact whose test perplexity the student should reach


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-pareto", dest="pareto", action="store_false", help="skip the exports and the Pareto table")
    p.add_argument("--out", default="runs/bench-scale")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from edgelm.distill.api import distill
    from edgelm.errors import EdgelmError

    t0 = time.perf_counter()
    out = Path(a.out)
    try:
        res = distill(teacher=a.teacher, layers=a.layers, intermediate_size=a.intermediate_size,
                      hidden_size=a.hidden_size, heads=a.heads, max_tokens=a.max_tokens, lr=a.lr,
                      eval_every=a.eval_every, ckpt_every=a.ckpt_every, eval_seqs=a.eval_seqs, eval_test=True,
                      out=str(out / "run"), resume=a.resume, force=not a.resume)
        pareto = _pareto(a, res.student_dir, out) if a.pareto else None
    except EdgelmError as e:
        sys.exit(f"error: {e}")
    _write(a, res, pareto, time.perf_counter() - t0)


def _pareto(a, student: Path, out: Path) -> list[dict]:
    """Export (or reuse) every artifact and bench each: test ppl and top-1 against its own fp32 model, size, decode."""
    from edgelm.artifact.api import export
    from edgelm.bench.api import bench
    from edgelm.manifest import read_manifest
    from edgelm.models.loader import resolve

    folders = {}
    for who, model, presets in (("teacher", a.teacher, TEACHER_PRESETS), ("student", str(student), STUDENT_PRESETS)):
        sha = resolve(model).sha256
        for preset in presets:
            folder = out / "artifacts" / f"{who}-{preset}"
            m = read_manifest(folder, verify=False) if (folder / "edgelm.json").exists() else None
            if m is None or m.get("source", {}).get("sha256") != sha:  # reuse only an export of this very model
                export(model=model, target="gguf", quant=preset, out=str(folder), force=True, check=False)
            folders[str(folder)] = (who, preset)
    result = bench(models=tuple(folders), threads=(1,), quality=True, split="test", eval_seqs=16, eval_seqlen=256,
                   repeat=3, progress=False)
    rows = []
    for r in result.rows:
        who, preset = folders[r["path"]]
        rows.append({"who": who, "preset": preset, "mib": r["size_bytes"] / 2**20, "ppl": r.get("ppl"),
                     "top1": r.get("top1_agree"), "tg": r.get("tg_tps_mean"), "error": r.get("error")})
    return rows


def _write(a, res, pareto: list[dict] | None, wall: float) -> None:
    from edgelm.metrics import fit_power_law, pareto_front
    from edgelm.report import md_table, plot_curves, plot_pareto, read_metrics, update_section

    docs = Path(a.docs)
    recs = read_metrics(res.metrics_path)
    evals = [r for r in recs if r.get("event") == "eval" and "test_ppl" in r]
    plot_curves({"val": evals, "test": [{**r, "val_ppl": r["test_ppl"]} for r in evals]}, "val_ppl",
                docs / "distill_scale.png", ylabel="perplexity", hline=("teacher (val)", res.val_teacher.ppl),
                logy=True)
    curve = [[r["tokens"], r["val_ppl"], r["test_ppl"], r["test_top1"]] for r in evals]
    target_ppl = None
    fit_text = "Too few evaluations for a fit."
    pts = [(r["tokens"], math.log(r["test_ppl"])) for r in evals if r["tokens"] > 0]
    pareto_text = "Pareto table skipped (--no-pareto)."
    if pareto:
        ok = [r for r in pareto if not r["error"]]
        front = pareto_front([(r["mib"], r["ppl"]) for r in ok])
        plot_pareto([{"label": r["preset"], "group": r["who"], "x": r["mib"], "y": r["ppl"], "front": f}
                     for r, f in zip(ok, front)], docs / "distill_pareto.png")
        target_ppl = next((r["ppl"] for r in ok if (r["who"], r["preset"]) == TARGET), None)
        rows = [[r["who"], r["preset"], r["mib"], r["ppl"], r["top1"], r["tg"], "yes" if f else ""]
                for r, f in zip(ok, front)]
        rows += [[r["who"], r["preset"], "", "", "", "", f"failed: {r['error']}"] for r in pareto if r["error"]]
        pareto_text = (md_table(["model", "artifact (GGUF)", "MiB", "test ppl", "top-1 agree vs fp32",
                                 "decode tok/s (llama.cpp, 1 thread)", "Pareto front"], rows)
                       + "\n![Pareto front](distill_pareto.png)\n")
    if len(pts) >= 3:
        try:
            law = fit_power_law([t for t, _ in pts], [n for _, n in pts])
            fit_text = (f"Fit of test nll: {law.floor:.3f} + {law.scale:.3g} * tokens^-{law.exponent:.3f} (floor ppl "
                        f"{math.exp(law.floor):.2f}).")
            if target_ppl:
                need = law.tokens_to_reach(math.log(target_ppl))
                fit_text += (f" The teacher Q4_0's test ppl {target_ppl:.2f} is "
                             + (f"reached at about {need:,.0f} tokens by this fit." if need else
                                "below the fit's floor: more tokens alone will not reach it at this shape."))
        except ValueError as e:
            fit_text = f"No fit: {e}."
    cmd = "python benchmarks/distill_scale.py " + shlex.join(sys.argv[1:])
    t = res.manifest.get("training", {})
    body = f"""## A longer distillation and the student against the quantized teacher (`benchmarks/distill_scale.py`)

Command: `{cmd.strip()}` on {platform.machine()}; this invocation took {wall / 60:.0f} min; training
{t.get('precision', '?')} ({t.get('precision_reason', '')}). Student: {res.manifest['student']['layers']} blocks, hidden
{res.manifest['student'].get('hidden_size')}, MLP {res.manifest['student']['intermediate_size']}; {res.tokens_seen:,}
tokens seen; val and test = {a.eval_seqs} sequences of 256 tokens each.

{md_table(["tokens", "val ppl", "test ppl", "test top-1"], curve)}
![scaling curve](distill_scale.png)

{fit_text}

{pareto_text}"""
    update_section(docs / "results.md", "distill_scale", body)
    logging.info("wrote %s", docs / "results.md")


if __name__ == "__main__":
    main()
