"""Mixed precision against llama.cpp's own quantizers at the same size: quality and decode speed.

    python benchmarks/quant_mixed.py [--models student teacher] [--student PATH] [--reuse]

For each model: llama.cpp's Q4_K_M, Q4_0 and Q8_0 and edgelm's GPTQ Q4_0 (the anchors), then `gptq-mixed` plans at
fractions of Q4_K_M's file size over two type sets (the fast pair Q4_0/Q8_0, and Q4_0/Q4_1/Q5_0/Q8_0), all planned
from one sensitivity measurement. Every artifact is checked in llama.cpp against the fp32 PyTorch model on the same
val sequences (ΔPPL, KLD, top-1), then `edgelm bench` times decode at 1 and 2 threads, one process per row.
Writes docs/results.md (section quant_mixed) and docs/quant_mixed.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.artifact.suite import export_suite
from edgelm.report import md_table, plot_pareto, update_section

MODELS = {"student": str(ROOT / "runs/bench-scale/run/student"), "teacher": "smollm2-135m-instruct"}
ANCHORS = ["llamacpp-q4_k_m", "llamacpp-q4_0", "gptq-int4-g32", "llamacpp-q8_0"]
IMATRIX = ["llamacpp-q4_k_m", "llamacpp-q4_0"]  # also with an importance matrix, when llama-quantize is there
TYPE_SETS = [("Q4_0", "Q8_0"), ("Q4_0", "Q4_1", "Q5_0", "Q8_0")]
FRACTIONS = (0.85, 0.9, 0.95, 1.0)  # of Q4_K_M's file size
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def register(p):
    """A preset variant, registered so the export suite finds it by name, like any plugin preset."""
    from edgelm.registry import QUANTS

    if p.name not in QUANTS.names():
        QUANTS.register(p)
    return p


def mixed_presets(q4km_mib: float, fractions, type_sets):
    """Plans at fractions of Q4_K_M's size over each type set, and the smallest plan (every matrix at Q4_0)."""
    from edgelm.quant.presets import get_preset

    base = get_preset("gptq-mixed")
    out = [register(base.with_options(budget_bpw=4.5, types=type_sets[0]))]
    for types in type_sets:
        for f in fractions:
            out.append(register(base.with_options(max_mib=round(q4km_mib * f, 1), types=types)))
    return out


def tensor_mib(artifact: str) -> float:
    """MiB of tensor data in an artifact's GGUF (the file adds its tokenizer and other metadata): what
    `--max-size` budgets."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(Path(artifact) / "model.gguf")).tensors) / 2**20


def imatrix_anchors() -> list[str]:
    from edgelm.converters.gguf import find_llama_quantize
    from edgelm.errors import EdgelmError
    from edgelm.quant.presets import get_preset

    try:
        find_llama_quantize()
    except EdgelmError as e:
        logging.warning("no imatrix anchors: %s", e)
        return []
    return [register(get_preset(q).with_options(imatrix=True)).name for q in IMATRIX]


def sensitivity_table(plan: dict) -> str:
    """The ten tensors whose Q4_0 costs the most, and each kind's types in this plan."""
    tensors = plan["tensors"]
    top = sorted(tensors.items(), key=lambda kv: -kv[1]["kld"]["Q4_0"])[:10]
    rows = [[n, f"{t['kld']['Q4_0']:.5f}", t["type"]] for n, t in top]
    kinds = []
    for k in KINDS:
        types = [t["type"] for n, t in tensors.items() if n.endswith(k)]
        counts = {ty: types.count(ty) for ty in sorted(set(types))}
        kld = sum(t["kld"]["Q4_0"] for n, t in tensors.items() if n.endswith(k))
        kinds.append([k, len(types), f"{kld:.4f}", ", ".join(f"{n} × {ty}" for ty, n in counts.items())])
    return (md_table(["tensor", "KLD alone at Q4_0", "type in this plan"], rows) + "\n\n" +
            md_table(["kind", "tensors", "sum of KLD alone at Q4_0", "types in this plan"], kinds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--student", default=MODELS["student"], help="the student to quantize (an HF folder)")
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    p.add_argument("--reuse", action="store_true", help="keep checked artifacts and mixed folders already under --out")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="measure no decode speed (speeds measured before, with --reuse, still show)")
    p.add_argument("--out", default=str(ROOT / "runs/bench-mixed"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torchao", "torch.utils._pytree", "gguf", "gguf.gguf_writer", "gguf.vocab", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    models = {**MODELS, "student": a.student}
    if "student" in a.models and not Path(a.student, "config.json").is_file():
        sys.exit(f"benchmarks/quant_mixed.py: no student at {a.student}; pass --student")

    from edgelm.bench.api import DecodeSpeeds
    from edgelm.manifest import read_manifest
    from edgelm.metrics import pareto_front
    from edgelm.quant.api import quantize_mixed_sweep

    t0 = time.perf_counter()
    rows, plans, sweep_s = [], {}, {}
    kw = dict(calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, eval_seqs=a.eval_seqs,
              eval_seqlen=a.eval_seqlen, threads=2)
    for name in a.models:
        out = Path(a.out) / name
        anchors = export_suite(models[name], [(q, "gguf") for q in ANCHORS + imatrix_anchors()], out, label=name,
                               reuse=a.reuse, **kw)
        q4km = next(r for r in anchors if r.preset == "llamacpp-q4_k_m" and not r.error)
        presets = mixed_presets(tensor_mib(q4km.path), a.fractions, TYPE_SETS)
        todo = [q for q in presets if not (a.reuse and (out / f"quantized-{q.name}" / "edgelm.json").is_file())]
        if todo:
            t1 = time.perf_counter()
            quantize_mixed_sweep(models[name], todo, out, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                                 force=True)
            sweep_s[name] = time.perf_counter() - t1
        onnx_ok = [q.name for q in presets if q.types == TYPE_SETS[0]]  # 4- and 8-bit plans: ONNX holds them too
        mixed = export_suite(models[name], [(q.name, "gguf") for q in presets] + [(q, "onnx") for q in onnx_ok], out,
                             label=name, reuse=True, **kw)
        for q in presets:
            plans[(name, q.name)] = read_manifest(out / f"quantized-{q.name}")["plan"]
        rows += anchors + mixed
    quality_s = time.perf_counter() - t0

    # decode tok/s kept in --out: a --reuse run measures only what is missing, and --no-speed shows what was
    # measured before (speed wants a quiet machine; quality does not)
    speed = DecodeSpeeds(Path(a.out) / "speed.json", reuse=a.reuse)
    if a.speed:
        speed.measure([r.path for r in rows if not r.error], tuple(a.threads), a.repeat)
    wall = time.perf_counter() - t0

    def tps(r, t):
        return speed(r.path, t)

    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "rows.json").write_text(json.dumps([{**r.as_dict(), "tg_tps": {t: tps(r, t) for t in a.threads}}
                                                       for r in rows], indent=2))
    table, points, goals, sens = [], [], [], []
    for name in a.models:
        mine = [r for r in rows if r.model == name and not r.error]
        front = pareto_front([(r.model_mib, r.dppl) for r in mine])
        for r, f in zip(mine, front):
            plan = plans.get((name, r.preset))
            label = f"{r.preset}: {plan['summary'].rsplit(' (', 1)[0]}" if plan else r.preset
            table.append([name, label, r.target, f"{r.model_mib:.1f}", f"{r.ppl:.3f}", f"{r.dppl:+.3f}",
                          f"{r.kld:.4f}", f"{r.top1_agree:.3f}",
                          *[f"{tps(r, t):.1f}" if tps(r, t) else "" for t in a.threads], "yes" if f else ""])
            points.append({"label": r.preset.replace("gptq-mixed+", "").replace("llamacpp-", "") +
                           (" onnx" if r.target == "onnx" else ""),
                           "group": f"{name}: {'edgelm mixed' if plan else 'anchors'}", "x": r.model_mib,
                           "y": max(r.dppl, 1e-3), "front": f})
        refs = {r.preset: r for r in mine if r.target == "gguf"}
        ref = refs.get("llamacpp-q4_k_m+imatrix") or refs["llamacpp-q4_k_m"]  # with imatrix when it was made
        mixed_gguf = [r for r in mine if (name, r.preset) in plans and r.target == "gguf"]
        fits = [r for r in mixed_gguf if r.model_mib <= ref.model_mib]
        better = [r for r in fits if r.dppl <= ref.dppl and r.kld <= ref.kld]
        best_q = min(fits, key=lambda r: r.kld) if fits else None
        goals.append(f"- {name}, quality at no more bytes than {ref.preset} ({ref.model_mib:.1f} MiB, ΔPPL "
                     f"{ref.dppl:+.3f}, KLD {ref.kld:.4f}): best mixed plan that fits "
                     f"{f'{best_q.preset} at {best_q.model_mib:.1f} MiB, ΔPPL {best_q.dppl:+.3f}, KLD {best_q.kld:.4f}' if best_q else 'none'}"
                     f" — {'met' if better else 'NOT met'}.")
        for t, need in zip(a.threads, (1.3, 1.2)):
            base = tps(ref, t)
            if base is None:
                goals.append(f"- {name}, decode at {t} thread(s): not measured in this run.")
                continue
            cands = [((tps(r, t) or 0) / base, r) for r in better]
            best = max(cands, key=lambda c: c[0]) if cands else None
            goals.append(f"- {name}, decode at {t} thread(s) against {ref.preset} ({base:.1f} tok/s) among plans "
                         f"at its quality: {f'{best[0]:.2f}x ({best[1].preset})' if best else 'no plan at its quality'}"
                         f" (goal ≥ {need}x) — {'met' if best and best[0] >= need else 'NOT met'}.")
        for r in [r for r in mine if r.target == "onnx" and (name, r.preset) in plans]:
            g = next((x for x in mixed_gguf if x.preset == r.preset), None)
            if g is not None and r.preset.startswith("gptq-mixed+budget_bpw=4.5"):
                ratio = r.model_mib / g.model_mib
                goals.append(f"- {name}, ONNX with the embedding shared with the 4-bit lm_head ({r.preset}): "
                             f"{r.model_mib:.1f} MiB against its GGUF's {g.model_mib:.1f} ({ratio:.2f}x, goal ≤ 1.15x) "
                             f"— {'met' if ratio <= 1.15 else 'NOT met'}; KLD {r.kld:.4f} against the GGUF's "
                             f"{g.kld:.4f}.")
        big = max(mixed_gguf, key=lambda r: r.model_mib, default=None)
        if big is not None:
            sens.append(f"**{name}**, plan `{big.preset}`:\n\n{sensitivity_table(plans[(name, big.preset)])}")
    plot = plot_pareto(points, docs / "quant_mixed.png", ylabel="ΔPPL against fp32 (val)")
    cmd = "python " + shlex.join(["benchmarks/quant_mixed.py", *sys.argv[1:]])
    heads = ["model", "artifact (mixed: types chosen)", "target", "MiB", "val ppl", "ΔPPL", "KLD", "top-1 agree",
             *[f"tg tok/s, {t} thr" for t in a.threads], "Pareto"]
    timing = ", ".join(f"{n} {s / 60:.1f} min" for n, s in sweep_s.items())
    body = f"""## Mixed precision against llama.cpp at the same size (`benchmarks/quant_mixed.py`)

`{cmd}` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {wall / 60:.1f} min
(quality {quality_s / 60:.1f} min{f'; sensitivity sweeps: {timing}' if timing else ''}). Student: `{Path(a.student).relative_to(ROOT) if Path(a.student).is_relative_to(ROOT) else a.student}`.
Val split, {a.eval_seqs} × {a.eval_seqlen} tokens, the same for every row, each GGUF in llama.cpp against the fp32
PyTorch model. Mixed plans (`gptq-mixed --max-size`) at {', '.join(f'{f:g}' for f in a.fractions)} × Q4_K_M's tensor data, over
{' and '.join('/'.join(t) for t in TYPE_SETS)}; calibration {a.calib_samples} × {a.calib_seqlen} train-split tokens.
Decode: `edgelm bench`, {a.repeat} runs after a warm-up, one process per row (llama.cpp for GGUF, ONNX Runtime for
ONNX). `+imatrix` anchors: llama.cpp's `llama-quantize` with edgelm's importance matrix from the same calibration set.

{md_table(heads, table)}

{chr(10).join(goals)}

Where the loss goes: each tensor's KL divergence when it alone is on Q4_0 (the plan's sensitivity, measured on
calibration sequences).

{chr(10).join(sens)}

![ΔPPL vs size]({plot.name})
"""
    update_section(docs / "results.md", "quant_mixed", body)
    print(body)


if __name__ == "__main__":
    main()
