"""QAT onto the fast all-Q4_0 grid against llama.cpp's Q4_K_M with an importance matrix: quality, bytes, decode speed.

    python benchmarks/qat.py [--models teacher student] [--tokens 50000 200000] [--compare-scales] [--reuse]

For each model: the anchors (edgelm's GPTQ all-Q4_0, `gptq-int4-g32-all`, the QAT start; llama.cpp's Q4_K_M with
edgelm's importance matrix), then `edgelm qat` from that GPTQ checkpoint, self-distilled against the model's own
float probabilities (train split only, the teacher's top-256 cached), once per token budget; with --compare-scales
also with the other scale mode (learned, where the default recomputes them from the weights) at the first budget. Every QAT checkpoint is exported to GGUF with its
exact check, and every artifact is measured in llama.cpp against the fp32 PyTorch model on the val sequences of the
mixed-precision table (32 x 256) and on as many test-split sequences; `edgelm bench` times decode at 1 and 2 threads,
one process per row. Writes docs/results.md (section qat) and docs/qat.png (the recovery curve).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.artifact.suite import export_suite  # noqa: E402
from edgelm.report import md_table, update_section  # noqa: E402

MODELS = {"teacher": "smollm2-135m-instruct", "student": str(ROOT / "runs/demo/student")}
PRESET = "gptq-int4-g32-all"  # every matrix on Q4_0, the tied embedding/lm_head too
ANCHOR = "llamacpp-q4_k_m+imatrix"
RECOVERY, TOP1, SPEEDUP = 0.75, 0.90, (1.6, 1.4)  # the goals: share of ΔPPL recovered, top-1, decode x


def register_imatrix() -> None:
    from edgelm.quant.presets import get_preset
    from edgelm.registry import QUANTS

    if ANCHOR not in QUANTS.names():
        QUANTS.register(get_preset("llamacpp-q4_k_m").with_options(imatrix=True))


def test_quality(model: str, artifact: str, n: int, seq_len: int) -> dict:
    """ΔPPL, KLD and top-1 agreement of an artifact (in its own runtime) against the fp32 model, on test-split
    sequences."""
    import numpy as np
    import torch

    from edgelm.data.corpus import Corpus, CorpusSpec, eval_sequences
    from edgelm.metrics import compare_logits
    from edgelm.models.streamed import load_reference
    from edgelm.quant.quality import model_logits
    from edgelm.runtimes.api import open_artifact

    ref, tok = load_reference(model)
    seqs = eval_sequences(Corpus(CorpusSpec(())), tok, "test", seq_len, n)
    rt = open_artifact(artifact, threads=2)
    try:
        q = compare_logits((torch.as_tensor(s), r, torch.as_tensor(np.asarray(rt.logits(s))).float())
                           for s, r in zip(seqs, model_logits(ref, seqs)))
    finally:
        getattr(rt, "close", lambda: None)()
    return q.as_dict()


GROUPS = {"tied embedding / lm_head": ("lm_head", "embed_tokens"), "attention (q, k, v, o)": ("self_attn",),
          "MLP (gate, up, down)": ("mlp",)}


def loss_by_group(model: str, checkpoint: Path, n: int, seq_len: int) -> dict[str, float]:
    """Where the loss stays: val KLD against fp32 of the quantized checkpoint (PyTorch), whole and with each group of
    matrices put back to fp32; a group's share is the KLD that restoring it removes."""
    import torch

    from edgelm.metrics import compare_logits
    from edgelm.models.qformat import load_quantized_model
    from edgelm.models.streamed import load_reference
    from edgelm.quant.quality import model_logits, val_sequences

    ref, tok = load_reference(model)
    seqs = val_sequences(tok, (), "text", n, seq_len)
    ref_logits = list(model_logits(ref, seqs))
    fp = ref.state_dict()

    def kld(m) -> float:
        return compare_logits((torch.as_tensor(s), r, c) for s, r, c in zip(seqs, ref_logits, model_logits(m, seqs))).kld

    q = load_quantized_model(checkpoint)
    out = {"all quantized": kld(q)}
    for group, parts in GROUPS.items():
        m = load_quantized_model(checkpoint)
        with torch.no_grad():
            for k, v in m.state_dict().items():
                if any(f".{p}." in f".{k}" for p in parts) and k in fp:
                    v.copy_(fp[k])
        out[group] = out["all quantized"] - kld(m)
    return out


def curve(run: Path) -> list[dict]:
    """The QAT run's val evaluations (PyTorch, the fake-quantized model = the artifact's codes): tokens, ppl."""
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"tokens": r["tokens"], "ppl": r["val_ppl"], "top1": r["val_top1"]} for r in recs if r["event"] == "eval"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["teacher"], choices=list(MODELS))
    p.add_argument("--student", default=MODELS["student"], help="the student (an HF folder)")
    p.add_argument("--tokens", nargs="+", type=int, default=[200_000], help="QAT token budgets, one run each")
    p.add_argument("--compare-scales", action="store_true",
                   help="also train with the other scale mode (learned / recomputed from the weights), at the first budget")
    p.add_argument("--lr", type=float, default=None, help="QAT peak lr (default: QatConfig's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=25, help="QAT steps between val evaluations (the curve)")
    p.add_argument("--reuse", action="store_true", help="keep checked artifacts and finished QAT runs under --out")
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-speed", dest="speed", action="store_false")
    p.add_argument("--out", default=str(ROOT / "runs/bench-qat"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    for noisy in ("torchao", "torch.utils._pytree", "gguf", "gguf.gguf_writer", "gguf.vocab", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    models = {**MODELS, "student": a.student}
    register_imatrix()

    from edgelm.bench.api import DecodeSpeeds, machine_info
    from edgelm.manifest import read_manifest
    from edgelm.qat.api import qat
    from edgelm.qat.config import QatConfig
    from edgelm.qat.fake import SCALE_MODES

    lr = a.lr or QatConfig.lr
    t0 = time.perf_counter()
    rows, runs = [], {}  # runs: (model, label) -> {"tokens", "wall_s", "curve", "scales"}
    kw = dict(calib_samples=128, calib_seqlen=512, eval_seqs=a.eval_seqs, eval_seqlen=a.eval_seqlen, threads=2)
    for name in a.models:
        out = Path(a.out) / name
        rows += export_suite(models[name], [(PRESET, "gguf"), (ANCHOR, "gguf")], out, label=name, reuse=a.reuse, **kw)
        start = out / f"quantized-{PRESET}"
        main_scales = QatConfig.scales  # the default; --compare-scales adds the other at the first budget
        other = next(m for m in SCALE_MODES if m != main_scales)
        todo = [(main_scales, t) for t in a.tokens] + ([(other, a.tokens[0])] if a.compare_scales else [])
        for scales, tokens in todo:
            label = f"qat-{scales}-{tokens // 1000}k"
            run = out / label / "run"
            done = run / "quantized" / "edgelm.json"
            if not (a.reuse and done.is_file() and read_manifest(run / "quantized")):
                qat(model=models[name], start=str(start), quant=PRESET, scales=scales, max_tokens=tokens, lr=lr,
                    batch_size=a.batch_size, seq_len=256, eval_every=a.eval_every, ckpt_every=100,
                    eval_seqs=a.eval_seqs, teacher_cache=str(out / "tcache"), out=str(run), force=True,
                    progress=False)
            m = read_manifest(run / "quantized")
            folder = out / label / f"quantized-{PRESET}"  # where the export suite finds a checkpoint to pack
            if not folder.is_dir():
                shutil.copytree(run / "quantized", folder)
            runs[(name, label)] = {"tokens": m["qat"]["tokens"], "wall_s": m["training"]["wall_s_this_process"],
                                   "scales": scales, "curve": curve(run), "fp_ppl": m["val"]["teacher"]["ppl"]}
            rows += export_suite(models[name], [(PRESET, "gguf")], out / label, label=f"{name} {label}", reuse=True,
                                 **kw)
    tests = {}
    for r in rows:
        if not r.error:
            model = models[r.model.split(" ")[0]]
            tests[r.path] = test_quality(model, r.path, a.eval_seqs, a.eval_seqlen)

    # decode tok/s kept in --out: a --reuse run measures only what is missing, and --no-speed shows what was
    # measured before (speed wants a quiet machine; quality does not)
    speed = DecodeSpeeds(Path(a.out) / "speed.json", reuse=a.reuse)
    if a.speed:
        speed.measure([r.path for r in rows if not r.error], tuple(a.threads), a.repeat)
    wall = time.perf_counter() - t0

    def tps(r, t):
        return speed(r.path, t)

    (Path(a.out) / "rows.json").write_text(json.dumps(
        [{**r.as_dict(), "test": tests.get(r.path), "tg_tps": {t: tps(r, t) for t in a.threads}} for r in rows],
        indent=2))
    table, goals, lines = [], [], []
    for r in rows:
        if r.error:
            table.append([r.model, r.preset, "", "", "", "", "", "", "", r.error[:80]])
            continue
        t = tests[r.path]
        table.append([r.model, r.preset, f"{r.model_mib:.1f}", f"{r.dppl:+.3f}", f"{r.kld:.4f}", f"{r.top1_agree:.3f}",
                      f"{t['dppl']:+.3f}", f"{t['kld']:.4f}",
                      " / ".join(f"{tps(r, th):.1f}" if tps(r, th) else "-" for th in a.threads), ""])
    for name in a.models:
        mine = {r.model: r for r in rows if not r.error and r.model.split(" ")[0] == name and r.preset == PRESET}
        ref = next((r for r in rows if r.model == name and r.preset == ANCHOR and not r.error), None)
        gptq = mine.get(name)
        if gptq is None or ref is None:
            goals.append(f"- {name}: anchors missing ({', '.join(r.error for r in rows if r.error)}).")
            continue
        for label, info in sorted(((k[1], v) for k, v in runs.items() if k[0] == name), key=lambda kv: kv[1]["tokens"]):
            r = mine.get(f"{name} {label}")
            if r is None:
                continue
            rec = (gptq.dppl - r.dppl) / gptq.dppl if gptq.dppl > 0 else 0.0
            t, tg = tests[r.path], tests[gptq.path]
            rec_t = (tg["dppl"] - t["dppl"]) / tg["dppl"] if tg["dppl"] > 0 else 0.0
            goals.append(
                f"- {name}, {label} ({info['tokens']:,} tokens, {info['wall_s'] / 60:.1f} min, scales {info['scales']}):"
                f" val ΔPPL {gptq.dppl:+.3f} → {r.dppl:+.3f}, **{100 * rec:.0f}% recovered** (goal ≥ {100 * RECOVERY:.0f}%, "
                f"ΔPPL ≤ {gptq.dppl * (1 - RECOVERY):+.3f}) — {'met' if rec >= RECOVERY else 'NOT met'}; test ΔPPL "
                f"{tg['dppl']:+.3f} → {t['dppl']:+.3f} ({100 * rec_t:.0f}%); KLD {gptq.kld:.4f} → {r.kld:.4f} "
                f"(Q4_K_M+imatrix {ref.kld:.4f}); top-1 agreement {gptq.top1_agree:.3f} → {r.top1_agree:.3f} "
                f"(goal ≥ {TOP1}) — {'met' if r.top1_agree >= TOP1 else 'NOT met'}.")
            at_quality = r.kld <= ref.kld
            for th, need in zip(a.threads, SPEEDUP):
                if tps(r, th) and tps(ref, th):
                    x = tps(r, th) / tps(ref, th)
                    goals.append(f"  - decode at {th} thread(s): {tps(r, th):.1f} against {ref.preset}'s "
                                 f"{tps(ref, th):.1f} tok/s, {x:.2f}x at {r.model_mib / ref.model_mib:.2f}x its bytes "
                                 f"(goal ≥ {need}x at its KLD or better) — "
                                 f"{'met' if at_quality and x >= need else 'NOT met' + ('' if at_quality else ' (KLD above the anchor)')}.")
            lines.append({"label": f"{name} {label}", "fp_ppl": info["fp_ppl"], "gptq_ppl": gptq.ppl_ref + gptq.dppl,
                          "curve": info["curve"]})
    where = []
    for name in a.models:
        best = max((k for k in runs if k[0] == name), key=lambda k: runs[k]["tokens"], default=None)
        if best is None:
            continue
        for label, folder in (("GPTQ start", Path(a.out) / name / f"quantized-{PRESET}"),
                              (best[1], Path(a.out) / name / best[1] / f"quantized-{PRESET}")):
            g = loss_by_group(models[name], folder, 8, a.eval_seqlen)
            where.append([name, label, f"{g['all quantized']:.4f}",
                          *[f"{g[k]:.4f} ({100 * g[k] / g['all quantized']:.0f}%)" for k in GROUPS]])
    plot = _plot(lines, Path(a.docs) / "qat.png")
    cmd = "python " + shlex.join(["benchmarks/qat.py", *sys.argv[1:]])
    heads = ["model", "artifact", "MiB", "val ΔPPL", "val KLD", "val top-1 agree", "test ΔPPL", "test KLD",
             f"tg tok/s ({' / '.join(str(t) for t in a.threads)} thr)", "error"]
    body = f"""## QAT onto the all-Q4_0 grid (`benchmarks/qat.py`)

`{cmd}` on {machine_info()['cpu']}, {os.cpu_count()} cores, {wall / 60:.1f} min for this invocation (`--reuse`
keeps finished QAT runs and checked artifacts; each QAT run's own time is in its line below). The three all-Q4_0 GGUFs hold the same types and bytes, so their decode speeds
differ by noise alone (rows run one after another). `edgelm qat MODEL --start GPTQ --quant {PRESET}`: self-distillation against the model's
own fp32 probabilities (top 256 cached), lr {lr:g}, batch {a.batch_size} × 256 tokens, train split only. Every row is
a GGUF in llama.cpp against the fp32 PyTorch model: val {a.eval_seqs} × {a.eval_seqlen} (the mixed-precision
table's sequences) and test {a.eval_seqs} × {a.eval_seqlen}. Decode: `edgelm bench`, {a.repeat} runs, one process
per row. Student: `{Path(a.student).relative_to(ROOT) if Path(a.student).is_relative_to(ROOT) else a.student}`.

{md_table(heads, table)}

{chr(10).join(goals)}

Where the loss stays (PyTorch, 8 val sequences): the checkpoint's KLD against fp32, and what putting each group of
matrices back to fp32 removes of it.

{md_table(["model", "checkpoint", "KLD", *[f"restoring {k}" for k in GROUPS]], where)}

![QAT recovery curve]({plot.name})
"""
    update_section(Path(a.docs) / "results.md", "qat", body)
    print(body)


def _plot(lines: list[dict], path: Path) -> Path:
    """Val ΔPPL against QAT tokens, one line per run (PyTorch evaluations of the fake-quantized model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for ln in lines:
        xs = [max(c["tokens"], 1) for c in ln["curve"]]
        ax.plot(xs, [c["ppl"] - ln["fp_ppl"] for c in ln["curve"]], marker="o", ms=3, label=ln["label"])
        ax.axhline((ln["gptq_ppl"] - ln["fp_ppl"]) * (1 - RECOVERY), ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set_xscale("symlog", linthresh=10_000)
    ax.set_xlim(left=0)
    ax.set_xlabel("QAT tokens")
    ax.set_ylabel("val ΔPPL against fp32 (PyTorch)")
    ax.set_title("QAT recovery (dotted: the 75% goal)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
