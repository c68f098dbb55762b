"""The TVM target against ONNX Runtime and llama.cpp on one student and one GPTQ checkpoint, at 1 and 2 threads.

    python benchmarks/tvm_target.py                 # the bench-scale student and its gptq-int4-g32 checkpoint
    python benchmarks/tvm_target.py --tune 64       # also a tuned TVM int4 artifact (meta-schedule, 64 trials)

Exports (or reuses, under --out) TVM fp32 and int4 artifacts, the GGUF and ONNX artifacts of the same checkpoint and
the fp32 GGUF; runs `edgelm bench` on all of them (one process per row, quality against the fp32 PyTorch student);
times the TVM kernels of one decode step and one 128-token prefill (`vm.set_instrument`); writes the tables and the
goals into docs/results.md (section "tvm").
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.report import md_table, update_section

STUDENT = ROOT / "runs/bench-scale/run/student"
QUANTIZED = ROOT / "runs/bench-mixed/student/quantized-gptq-int4-g32"
PRESET = "gptq-int4-g32"


def artifacts(out: Path, student: Path, quantized: Path, tune: int) -> dict[str, Path]:
    """name -> artifact folder, exported unless already there."""
    from edgelm.artifact.api import export
    from edgelm.quant.api import quantize

    if not (quantized / "edgelm.json").is_file():
        quantize(model=str(student), quant=PRESET, out=str(quantized))
    plan = {"tvm-fp32": (student, "tvm", "fp32", {}), f"tvm-{PRESET}": (quantized, "tvm", PRESET, {}),
            "gguf-fp32": (student, "gguf", "fp32", {}), f"gguf-{PRESET}": (quantized, "gguf", PRESET, {}),
            f"onnx-{PRESET}": (quantized, "onnx", PRESET, {})}
    if tune:
        plan[f"tvm-{PRESET}-tuned{tune}"] = (quantized, "tvm", PRESET, {"tune": tune})
    done = {}
    for name, (src, target, quant, opts) in plan.items():
        folder = out / name
        if not (folder / "edgelm.json").is_file():
            logging.info("exporting %s", name)
            export(model=str(src), target=target, quant=quant, out=str(folder), force=True, **opts)
        done[name] = folder
    return done


def kernel_times(folder: Path, threads: int, prompt: int, steps: int = 16) -> dict[str, list]:
    """{"decode": [(kernel, ms per step, calls per step, GB/s)], "prefill": [...]}: TVM's VM instrumented. GB/s is
    the bytes of a matmul's arguments (its weights, mostly) over its time; then three summary rows: all matmuls,
    every other kernel, and what falls between kernels (the VM's own work, plus the instrument's Python callbacks: the
    first row is the call timed without the instrument, the second with it)."""
    import numpy as np

    from edgelm.runtimes.tvmrt import TvmRuntime

    rt = TvmRuntime(folder, threads=threads)
    ids = list(range(100, 100 + prompt))
    out = {}
    calls_of = {"prefill": 1, "decode": steps}  # timed calls per phase

    def per_call(phase: str, hook=None) -> float:
        """Seconds per prefill, or per decode step after a prefill, with ``hook`` instrumenting only those calls."""
        if phase == "decode":
            rt._prefill(ids)
        if hook is not None:
            rt._session.vm.set_instrument(hook)
        t0 = time.perf_counter()
        if phase == "prefill":
            rt._prefill(ids)
        else:
            for _ in range(steps):
                rt._step(5)
        took = (time.perf_counter() - t0) / calls_of[phase]
        rt._session.vm.set_instrument(lambda *a: 0)
        return took

    for phase in ("prefill", "decode"):
        n = calls_of[phase]
        rt._prefill(ids)  # warm
        plain = per_call(phase)
        times: dict[str, float] = collections.defaultdict(float)
        calls: collections.Counter = collections.Counter()
        nbytes: dict[str, int] = {}
        start: dict[str, float] = {}

        def instrument(func, name, before, ret, *args):
            if before:
                if name not in nbytes:
                    nbytes[name] = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in args
                                       if type(x).__name__ == "Tensor")
                start[name] = time.perf_counter()
            else:
                times[name] += time.perf_counter() - start[name]
                calls[name] += 1
            return 0

        total = per_call(phase, instrument)
        linear = ("matmul", "qgemv")  # TVM's matmuls and edgelm's one-token quantized linears
        rows = sorted(((k, 1000 * v / n, calls[k] // n,
                        nbytes[k] * calls[k] / v / 1e9 if any(w in k for w in linear) and v else None)
                       for k, v in times.items()), key=lambda r: -r[1])
        mm = [r for r in rows if r[3] is not None]
        mm_ms = sum(r[1] for r in mm)
        mm_gb = sum(nbytes[r[0]] * r[2] for r in mm) / 1e9
        attention = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
        other = sum(r[1] for r in rows if r[3] is None and r[0] != attention)
        summary = [("(all matmuls and quantized linears)", mm_ms, sum(r[2] for r in mm),
                    mm_gb / mm_ms * 1000 if mm_ms else None),
                   ("(other kernels and builtins, attention excluded)", other, None, None),
                   ("(between kernels: VM and Python)", 1000 * total - sum(r[1] for r in rows), None, None)]
        out[phase] = [("(whole call)", 1000 * plain, 1, None), ("(whole call, instrumented)", 1000 * total, 1, None)]
        out[phase] += rows + summary
    rt.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=str(STUDENT))
    p.add_argument("--quantized", default=str(QUANTIZED), help=f"its {PRESET} checkpoint (made if missing)")
    p.add_argument("--tune", type=int, default=0, help="also a TVM int4 artifact tuned with this many trials")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "runs/bench-tvm"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--reuse", action="store_true", help="re-render from --out/bench.json instead of re-running")
    p.add_argument("--kernels", action="store_true", help="with --reuse: time the TVM kernels again (a minute)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arts = artifacts(out, Path(a.student), Path(a.quantized), a.tune)
    t0 = time.perf_counter()
    from edgelm.bench.api import BenchResult, bench
    from edgelm.bench.config import BenchConfig

    if a.reuse:
        saved = json.loads((out / "bench.json").read_text())
        res = BenchResult(saved["header"], saved["rows"])
    else:
        res = bench(BenchConfig(models=tuple(str(f) for f in arts.values()), threads=tuple(a.threads), repeat=3,
                                prompt_len=128, gen_len=64, quality=True, reference=a.student,
                                json=str(out / "bench.json")))
    if a.reuse and not a.kernels:
        kernels = json.loads((out / "kernels.json").read_text())
    else:
        kernels = {name: kernel_times(arts[name], 1, 128) for name in arts if name.startswith("tvm-")}
        (out / "kernels.json").write_text(json.dumps(kernels, indent=1))
    wall = time.perf_counter() - t0
    rows = {(Path(r["path"]).name, r["threads"]): r for r in res.rows if not r.get("error")}

    def ratio(x: str, y: str, t: int, key: str) -> str:
        if (x, t) not in rows or (y, t) not in rows:
            return "n/a"
        return f"{rows[x, t][key] / rows[y, t][key]:.2f}x"

    goals = []
    for t in a.threads:
        q4 = f"tvm-{PRESET}"
        goals.append(f"- {t} thread(s): TVM int4 decode {rows[q4, t]['tg_tps_mean']:.1f} tok/s = "
                     f"{ratio(q4, f'gguf-{PRESET}', t, 'tg_tps_mean')} llama.cpp's Q4_0 of the same codes "
                     f"({rows[f'gguf-{PRESET}', t]['tg_tps_mean']:.1f}); goal ≥ 1.00x at 1 thread. TVM fp32 "
                     f"{ratio('tvm-fp32', 'gguf-fp32', t, 'tg_tps_mean')} llama.cpp fp32.")
        goals.append(f"- {t} thread(s): 128-token prefill, TVM int4 {1000 * 128 / rows[q4, t]['pp_tps_mean']:.0f} ms "
                     f"against llama.cpp Q4_0 {1000 * 128 / rows[f'gguf-{PRESET}', t]['pp_tps_mean']:.0f} ms "
                     f"({ratio(f'gguf-{PRESET}', q4, t, 'pp_tps_mean')} slower; goal ≤ 3x); fp32 "
                     f"{1000 * 128 / rows['tvm-fp32', t]['pp_tps_mean']:.0f} ms against "
                     f"{1000 * 128 / rows['gguf-fp32', t]['pp_tps_mean']:.0f} ms "
                     f"({ratio('gguf-fp32', 'tvm-fp32', t, 'pp_tps_mean')}).")
    m = {n: json.loads((f / "edgelm.json").read_text()) for n, f in arts.items()}
    def fmt(par: dict, key: str, spec: str) -> str:
        return format(par[key], spec) if key in par else "n/a"

    q = [[n, fmt(m[n]["parity"], "kld", ".4f"), fmt(m[n]["parity"], "top1_agree", ".3f"),
          f"{m[n]['parity']['ppl'] - m[n]['parity']['ppl_ref']:+.3f}" if "ppl" in m[n]["parity"] else "n/a",
          f"{m[n].get('compile_seconds', '')}", f"{(m[n].get('tuning') or {}).get('seconds', '')}"]
         for n in arts]
    ktab = []
    for name, phases in kernels.items():
        for phase, ks in phases.items():
            ks = [(list(k) + [None])[:4] for k in ks]  # kernels.json from before GB/s was recorded
            top = ks[:8] + [k for k in ks[8:] if k[0].startswith("(")]
            ktab += [[name, phase, k, f"{ms:.2f}", "" if n is None else n, f"{gbs:.1f}" if gbs else ""]
                     for k, ms, n, gbs in top]
    cmd = "python " + shlex.join(["benchmarks/tvm_target.py", *sys.argv[1:]])
    h = res.header
    trained = json.loads((Path(a.student) / "edgelm.json").read_text()).get("training", {}).get("tokens_seen")
    acts = m[f"tvm-{PRESET}"].get("activations", "float32")
    body = f"""## TVM against ONNX Runtime and llama.cpp
`{cmd}` on {h['cpu']}, {h['physical_cores']} physical cores ({wall / 60:.1f} min for the bench). The bench-scale
student ({f"{trained:,} tokens of distillation" if trained else "its training unrecorded"}; speed does not depend on
it) and one `{PRESET}` checkpoint of it, exported to TVM (untuned: edgelm's own matmul schedule; activations:
{acts}), GGUF (exact Q4_0) and ONNX (MatMulNBits); each row in its own process, prompt
128 tokens, 64 generated, mean ± std of 3 runs; quality against the fp32 PyTorch student on 8 × 128 test-split
tokens (the prompt path, float activations in TVM).

{res.table()}

{chr(10).join(goals)}

Each artifact's own export check (val split, 16 × 128 tokens; TVM compile and tuning seconds):

{md_table(["artifact", "KLD", "top-1", "ΔPPL", "compile s", "tuning s"], q)}

Where TVM's time goes (`vm.set_instrument`, 1 thread; ms per decode step or per 128-token prefill, calls per step;
GB/s: a matmul's argument bytes, its weights mostly, over its time; the largest kernels, then sums):

{md_table(["artifact", "phase", "kernel", "ms", "calls", "GB/s"], ktab)}
"""
    update_section(Path(a.docs) / "results.md", "tvm", body)
    print(res.table())
    print("\n".join(goals))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
