"""Quantization quality of every preset and llama.cpp type, on the demo's student and on the teacher itself.

    python benchmarks/quant_quality.py [--models student teacher] [--presets ...] [--calib-samples 128]

Each artifact is measured in its own runtime (llama.cpp for GGUF, ONNX Runtime for ONNX) against the fp32 PyTorch
model on the same val sequences: perplexity, ΔPPL, KL divergence and top-1 agreement. Also the teacher's GGUF as
shipped (Q4_1), and the peak RSS of an fp32 GGUF export against the fp32 model size. Writes docs/results.md
(section quant_quality) and docs/quant_quality.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.artifact.suite import export_suite, gguf_file_row
from edgelm.report import md_table, plot_quant, quant_table, update_section

GGUF = ["fp32", "fp16", "int8", "int4-g32", "int4-g128", "gptq-int4-g32", "gptq-int4-g128", "gptq-int8",
        "llamacpp-q8_0", "llamacpp-q6_k", "llamacpp-q5_k_m", "llamacpp-q4_k_m", "llamacpp-q4_0"]
ONNX = ["fp32", "int8", "int4-g32", "gptq-int4-g32"]
# The teacher is twice the student: by default it gets the rows the quality goal compares, to keep this under an hour.
TEACHER_GGUF = ["fp32", "int4-g32", "gptq-int4-g32", "llamacpp-q8_0", "llamacpp-q4_k_m", "llamacpp-q4_0"]
MODELS = {"student": str(ROOT / "runs/demo/student"), "teacher": "smollm2-135m-instruct"}


# edgelm.metrics.peak_rss_bytes: VmHWM, not ru_maxrss, which a child inherits from a large parent at fork.
RSS_PROBE = """
import sys
import numpy, torch, transformers  # the baseline a Python exporter pays before touching weights
from edgelm.artifact.api import export
from edgelm.metrics import peak_rss_bytes
base = peak_rss_bytes() // 1024
export(model=sys.argv[1], target="gguf", quant="fp32", out=sys.argv[2], force=True, check=False)
print(base, peak_rss_bytes() // 1024)
"""


def export_peak_rss(model: str, out: Path) -> tuple[float, float, float]:
    """(peak RSS MiB, RSS MiB after imports, fp32 model MiB) of an fp32 GGUF export (no check) in a fresh process."""
    from edgelm.models.loader import resolve

    folder = Path(resolve(model).path)  # also the teacher's one-time GGUF dequantization, before the probe
    fp32_mib = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, model, str(out)], capture_output=True, text=True, check=True,
                       cwd=ROOT)
    base, peak = (int(x) / 1024 for x in r.stdout.split()[-2:])
    return peak, base, fp32_mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--gguf", nargs="+", default=GGUF, help="presets exported to GGUF")
    p.add_argument("--onnx", nargs="+", default=ONNX, help="presets exported to ONNX")
    p.add_argument("--teacher-gguf", nargs="+", default=TEACHER_GGUF, help="presets exported to GGUF for the teacher")
    p.add_argument("--teacher-onnx", nargs="*", default=[], help="presets exported to ONNX for the teacher")
    p.add_argument("--threads", type=int, default=2, help="runtime threads while measuring (quality only)")
    p.add_argument("--reuse", action="store_true", help="keep checked artifacts already under --out")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "runs/bench-quant"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torchao", "torch.utils._pytree", "gguf", "gguf.gguf_writer", "gguf.vocab"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "student" in a.models and not Path(MODELS["student"], "config.json").is_file():
        sys.exit("benchmarks/quant_quality.py: no student at runs/demo/student; run `make demo` first")

    t0 = time.perf_counter()
    rows, rss = [], []
    for name in a.models:
        gguf, onnx = (a.teacher_gguf, a.teacher_onnx) if name == "teacher" else (a.gguf, a.onnx)
        plan = [(q, "gguf") for q in gguf] + [(q, "onnx") for q in onnx]
        out = Path(a.out) / name
        rows += export_suite(MODELS[name], plan, out, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                             eval_seqs=a.eval_seqs, eval_seqlen=a.eval_seqlen, threads=a.threads, label=name,
                             reuse=a.reuse)
        if name == "teacher":
            from edgelm.models.loader import resolve

            shipped = resolve(MODELS["teacher"]).info["gguf"]
            rows.append(gguf_file_row(shipped, MODELS["teacher"], "teacher", "as shipped (Q4_1)",
                                      eval_seqs=a.eval_seqs, eval_seqlen=a.eval_seqlen, threads=a.threads))
        rss.append((name, *export_peak_rss(MODELS[name], out / "rss-probe")))
    wall = time.perf_counter() - t0

    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "rows.json").write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    plot = plot_quant(rows, docs / "quant_quality.png")

    def best(model: str, preset: str, target: str = "gguf"):
        return next((r for r in rows if r.model == model and r.preset == preset and r.target == target and not r.error), None)

    goal_lines = []
    for m in a.models:
        ours, q40, qkm = best(m, "gptq-int4-g32"), best(m, "llamacpp-q4_0"), best(m, "llamacpp-q4_k_m")
        if ours and q40 and qkm:
            ok = ours.dppl <= 0.5 * q40.dppl and ours.dppl <= qkm.dppl
            goal_lines.append(f"- {m}: GPTQ→Q4_0 ΔPPL {ours.dppl:+.3f} vs llama.cpp Q4_0 {q40.dppl:+.3f} "
                              f"(ratio {ours.dppl / q40.dppl:.2f}) and Q4_K_M {qkm.dppl:+.3f}"
                              f"{f' ({qkm.fallbacks} tensors fell back)' if qkm.fallbacks else ''}: "
                              f"goal (≤ ½ of Q4_0 and ≤ Q4_K_M) {'met' if ok else 'NOT met'}.")
    cmd = "python " + shlex.join(["benchmarks/quant_quality.py", *sys.argv[1:]])
    body = f"""## Quantization quality

`{cmd}` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {wall / 60:.1f} min.
Val split of the stdlib corpus, {a.eval_seqs} × {a.eval_seqlen} tokens, the same sequences for every row; each artifact
runs in its own runtime (llama.cpp for GGUF, ONNX Runtime for ONNX) against the fp32 PyTorch model. GPTQ calibrates
on {a.calib_samples} × {a.calib_seqlen} train-split tokens. MiB is the model file(s) only. "fallbacks" counts tensors
llama.cpp stored in another type than asked (rows of 576 are not a multiple of 256, so K-quants fall back).

{quant_table(rows)}

{chr(10).join(goal_lines)}

Peak RSS of an fp32 GGUF export (`--no-check`) in a fresh process, against the fp32 model. "export" is the peak
above the process's RSS after importing torch and transformers; the goal is at most 1.5× the model:

{md_table(["model", "fp32 model MiB", "RSS after imports", "peak RSS", "export (peak - imports)", "export / model"],
          [[n, f"{m:.0f}", f"{b:.0f}", f"{r:.0f}", f"{r - b:.0f}", f"{(r - b) / m:.2f}"] for n, r, b, m in rss])}

![ΔPPL vs size]({plot.name})
"""
    update_section(docs / "results.md", "quant_quality", body)
    print(body)


if __name__ == "__main__":
    main()
