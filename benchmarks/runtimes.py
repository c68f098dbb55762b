"""Runtimes side by side (issue 4): every artifact of the demo's student, at 1 and 2 threads, in one run.

    python benchmarks/runtimes.py            # after `make demo` and `make bench-quant` (which exports every preset)

Runs `edgelm bench` (one process per row) with --quality against the fp32 PyTorch student and --overhead, measures
the memory bandwidth for the decode roofline (bytes read per token / bandwidth), and writes the table and plot into
docs/results.md (section "runtimes") and docs/runtimes.png.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelm.bench.api import bench  # noqa: E402
from edgelm.bench.config import BenchConfig  # noqa: E402
from edgelm.report import md_table, update_section  # noqa: E402

STUDENT = ROOT / "runs/demo/student"


def read_bandwidth(threads: int, mib: int = 512, repeat: int = 5) -> float:
    """Bytes/s that ``threads`` threads read from DRAM (numpy sums of disjoint slices; best of ``repeat``)."""
    import numpy as np

    a = np.ones(mib * 2**20 // 8)  # far larger than any cache
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeat):
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(ROOT / "runs/bench-quant/student"), help="folder of exported artifacts")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "runs/bench-runtimes"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (STUDENT / "config.json").is_file():
        sys.exit("benchmarks/runtimes.py: no student at runs/demo/student; run `make demo` first")
    arts = sorted(d for d in Path(a.artifacts).glob("*-*") if (d / "edgelm.json").is_file() and
                  (d.name.startswith(("gguf-", "onnx-"))))
    if not arts:
        sys.exit(f"benchmarks/runtimes.py: no artifacts under {a.artifacts}; run `make bench-quant` (or pass --artifacts)")
    bw = {t: read_bandwidth(t) for t in a.threads}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    docs = Path(a.docs)
    t0 = time.perf_counter()
    res = bench(BenchConfig(models=(str(STUDENT), *map(str, arts)), threads=tuple(a.threads), repeat=a.repeat,
                            prompt_len=a.prompt_len, gen_len=a.gen_len, quality=True, reference=str(STUDENT),
                            overhead=True, json=str(Path(a.out) / "bench.json"), plot=str(docs / "runtimes.png")))
    wall = time.perf_counter() - t0
    ok = [r for r in res.rows if not r.get("error")]

    # roofline: every weight byte read once per token (the tied embedding is the lm_head, so it is read too)
    roof_rows = []
    for r in sorted(ok, key=lambda r: (r["threads"], -r["tg_tps_mean"])):
        limit = bw[r["threads"]] / r["size_bytes"]
        roof_rows.append([r["model"], r["runtime"], r["threads"], f"{r['size_bytes'] / 2**20:.1f}",
                          f"{r['tg_tps_mean']:.1f}", f"{limit:.0f}", f"{100 * r['tg_tps_mean'] / limit:.0f}%"])

    lines = []
    for t in a.threads:
        rows_t = [r for r in ok if r["threads"] == t]
        km = next((r for r in rows_t if r["preset"] == "llamacpp-q4_k_m"), None)
        if not km:
            continue
        same_or_better = [r for r in rows_t if r["kld"] <= km["kld"] * 1.0001]
        best = max(same_or_better, key=lambda r: r["tg_tps_mean"])
        fastest = max(rows_t, key=lambda r: r["tg_tps_mean"])
        lines.append(f"- {t} thread(s): fastest at Q4_K_M's quality or better (KLD ≤ {km['kld']:.4f}): **{best['model']}** "
                     f"on {best['runtime']}, {best['tg_tps_mean']:.1f} tok/s = {best['tg_tps_mean'] / km['tg_tps_mean']:.2f}× "
                     f"llama.cpp Q4_K_M ({km['tg_tps_mean']:.1f} tok/s). Fastest overall: {fastest['model']} on "
                     f"{fastest['runtime']}, {fastest['tg_tps_mean']:.1f} tok/s, KLD {fastest['kld']:.4f}.")
    for t in a.threads:
        one = {r["model"]: r["tg_tps_mean"] for r in ok if r["threads"] == t}
        if t != min(a.threads):
            base = {r["model"]: r["tg_tps_mean"] for r in ok if r["threads"] == min(a.threads)}
            faster = sum(one[m] > base[m] for m in one if m in base)
            lines.append(f"- {t} threads beat {min(a.threads)} on decode for {faster} of {len(one)} models.")
    over = [r["overhead_pct"] for r in ok if r.get("overhead_pct") is not None]
    if over:
        worst = max(ok, key=lambda r: r.get("overhead_pct") or -1e9)
        lines.append(f"- edgelm's wrapper vs each backend's bare greedy loop: median {sorted(over)[len(over) // 2]:+.1f}%, "
                     f"worst {worst['overhead_pct']:+.1f}% ({worst['model']} on {worst['runtime']}, {worst['threads']} "
                     f"thread(s), {worst['overhead_ms_per_token']:+.3f} ms/token); goal < 5%.")
    h = res.header
    cmd = "python " + shlex.join(["benchmarks/runtimes.py", *sys.argv[1:]])
    body = f"""## Runtimes side by side (issue 4)

`{cmd}` on {h['cpu']}, {h['physical_cores']} physical cores, {wall / 60:.1f} min; every artifact of the demo's
student (exported by `make bench-quant`) and the fp32 PyTorch student, each row in its own process. Prompt
{a.prompt_len} tokens from the stdlib test split, {a.gen_len} generated (end-of-sequence masked), mean ± std of
{a.repeat} runs after a warm-up. Quality: {res.header['config']['eval_seqs']} × {res.header['config']['eval_seqlen']}
test-split tokens against the fp32 PyTorch student. "overhead/token" compares edgelm's `generate` with the backend's
bare greedy loop on the same prompt (negative = within noise). Libraries: {", ".join(f"{k} {v}" for k, v in h['libraries'].items())}.

{res.table()}
{chr(10).join(lines)}

Decode roofline: measured DRAM read bandwidth {", ".join(f"{bw[t] / 1e9:.1f} GB/s at {t} thread(s)" for t in a.threads)}
(numpy sums over 512 MiB). The physical limit for decode is bandwidth / bytes read per token, taken as the model
file size (every weight, including the tied embedding used as the lm_head, is read once per token):

{md_table(["model", "runtime", "threads", "MiB", "tg t/s", "roofline t/s", "of roofline"], roof_rows)}
![decode tok/s vs size and ΔPPL](runtimes.png)
"""
    update_section(docs / "results.md", "runtimes", body)
    print(res.table())
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
