"""The mobile app's runtimes in headless desktop Chromium (Pixel 7 emulation) against the same artifacts natively on
the same machine (writes the `app` section of docs/results.md). A thin caller of `edgelm bench --device browser`:
the browser rows come from the bench page, the native rows from `edgelm bench`.

    python benchmarks/app.py                                   # the demo's GGUF and ONNX artifacts, 1 and 2 threads
    python benchmarks/app.py runs/x/gguf-a runs/x/gguf-b --threads 1,2,4 --tokens 64 --repeat 3
    python benchmarks/app.py runs/x/gguf-a --threads 2 --rounds 5         # a steadier reading: median of 5 rounds

Each artifact runs at each thread count on the bench page served cross-origin isolated (wllama may use threads)
and, at the largest thread count, also served without the isolation headers as a plain web host would
(`--no-isolation`: wllama then runs one thread). With `--rounds N` every page run is repeated N times in turn,
and a row reads the median round: this machine's speed drifts by 5-10% within minutes. Native rows are
`edgelm bench` (llama.cpp through llama-cpp-python, onnxruntime-genai for ONNX), one process per row. This is
desktop x86 Chromium on 2 cores, not a phone.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["gguf-gptq-int4-g32-all", "gguf-gptq-int4-g32", "gguf-llamacpp-q4_0", "gguf-gptq-int8", "gguf-llamacpp-q8_0", "onnx-gptq-int4-g32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="*", help="GGUF and ONNX artifact folders (default: the demo's that exist)")
    p.add_argument("--threads", default="1,2", help="thread counts (default: 1,2)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer (default: 64)")
    p.add_argument("--repeat", type=int, default=3, help="measured answers per row, after one warm-up (default: 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="page measurements per row, taken round-robin over all rows so that each row's are spread "
                        "over the run; a row then reads the median of its rounds (default: 1)")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from edgelm.app.browser import browser_missing
    from edgelm.errors import EdgelmError

    arts = a.artifacts or [str(ROOT / "runs" / "demo" / "export" / d) for d in DEFAULT
                           if (ROOT / "runs" / "demo" / "export" / d / "edgelm.json").is_file()]
    threads = [int(t) for t in a.threads.split(",")]
    why = browser_missing()
    if not arts or why:
        sys.exit(f"error: {why or 'no GGUF artifacts: run `make demo` first or pass artifact folders'}")
    if a.rounds < 1:
        sys.exit(f"error: --rounds {a.rounds}: give 1 or more (each row's page is measured that many times)")
    t0 = time.perf_counter()
    try:
        native = _native(arts, threads, a)
        page = _page(arts, threads, a)
    except EdgelmError as e:
        sys.exit(f"error: {e}")
    _write(a, arts, native, page, time.perf_counter() - t0)


def _native(arts: list[str], threads: list[int], a) -> dict[tuple[str, int], dict]:
    from edgelm.bench.api import bench

    res = bench(models=tuple(arts), threads=tuple(threads), gen_len=a.tokens, repeat=a.repeat, progress=False)
    return {(r["path"], r["threads"]): r for r in res.rows}


def _page(arts: list[str], threads: list[int], a) -> list[dict]:
    """One row per artifact x (threads, isolated), each the median of its rounds."""
    from edgelm.app.browser import Browser, bench_in_browser

    runs = [(tuple(threads), True), ((max(threads),), False)]
    got: dict[tuple[str, int, bool], list[dict]] = {}
    with Browser() as browser:
        for rnd in range(a.rounds):  # each round runs every row afresh, in turn with the others
            for ts, isolated in runs:
                res = bench_in_browser(browser, models=tuple(arts), threads=ts, gen_len=a.tokens, repeat=a.repeat,
                                       isolation=isolated, progress=False)
                for r, t in zip(res.rows, [t for _ in arts for t in ts]):
                    got.setdefault((r["path"], t, isolated), []).append(r)
                logging.info("round %d, %s: %s", rnd + 1, "isolated" if isolated else "plain",
                             [(r["model"], r["threads"], r["tg_tps_mean"]) for r in res.rows])
    return [_median_of_rounds(path, t, isolated, rounds) for (path, t, isolated), rounds in got.items()]


def _median_of_rounds(path: str, threads: int, isolated: bool, rounds: list[dict]) -> dict:
    """One row from its rounds: the median of each figure, with the range of the rounds' decode tok/s."""
    row = {"model": Path(path).name, "path": path, "threads": threads, "isolated": isolated,
           "mib": rounds[0]["size_bytes"] / 2**20 if rounds[0].get("size_bytes") else None}
    ok = [r for r in rounds if not r.get("error")]
    if not ok:
        return {**row, "error": rounds[0]["error"]}
    return {**row, "threads_used": statistics.median(r["threads"] for r in ok),
            "tps": statistics.median(r["tg_tps_mean"] for r in ok), "tps_std": ok[0]["tg_tps_std"],
            "load_s": statistics.median(r["load_s"] for r in ok),
            "ttft_ms": statistics.median(r["ttft_ms_mean"] for r in ok), "tps_rounds": [r["tg_tps_mean"] for r in ok]}


def _tps_cell(r: dict) -> str:
    """A row's decode tok/s: mean ± std of one round's runs, or the median and range of several rounds."""
    tps = r["tps_rounds"]
    if len(tps) == 1:
        return f"{r['tps']:.1f} ± {r['tps_std']:.1f}"
    return f"{r['tps']:.1f} ({min(tps):.1f}-{max(tps):.1f})"


def _npm_version(package: str) -> str:
    """The version of an npm package the app ships, as android_demo/package-lock.json pins it."""
    lock = json.loads((ROOT / "android_demo" / "package-lock.json").read_text())
    return lock["packages"][f"node_modules/{package}"]["version"]


def _write(a, arts, native, page, wall: float) -> None:
    from edgelm.report import md_table, update_section

    rows = []
    for r in page:
        nat = native.get((r["path"], r["threads"] if r["isolated"] else 1), {})
        if r.get("error"):
            rows.append([r["model"], r["mib"], r["threads"], "yes" if r["isolated"] else "no", "", "", "", "", "", "",
                         f"failed: {r['error']}"])
            continue
        n_tps = nat.get("tg_tps_mean")
        rows.append([r["model"], r["mib"], r["threads"], "yes" if r["isolated"] else "no", r["threads_used"],
                     r["load_s"], r["ttft_ms"], _tps_cell(r),
                     nat.get("ttft_ms_mean", ""), n_tps or "", f"{r['tps'] / n_tps:.2f}" if n_tps else ""])
    best = max((r for r in page if not r.get("error")), key=lambda r: r["tps"], default=None)
    goal = 60.0
    verdict = "no row measured"
    if best:
        nat_best = max((n["tg_tps_mean"] for n in native.values() if n.get("tg_tps_mean")), default=0.0)
        target = min(goal, nat_best / 2) if nat_best else goal
        verdict = (f"best: {best['model']} at {best['threads']} thread(s), {best['tps']:.1f} tok/s; the goal "
                   f"({target:.0f} tok/s: 60, or half of native if lower) is "
                   f"{'met' if best['tps'] >= target else 'missed'}")
    cmd = "python benchmarks/app.py " + shlex.join(sys.argv[1:])
    wllama, ort = _npm_version("@wllama/wllama"), _npm_version("onnxruntime-web")
    rounds = (f", in each of {a.rounds} rounds taken in turn over the rows; a row reads the median round, with the "
              "rounds' range" if a.rounds > 1 else "")
    body = f"""## The mobile app in a browser against native (`benchmarks/app.py`)

Command: `{cmd.strip()}` on {platform.machine()} ({a.repeat} runs of {a.tokens} tokens per row after a
warm-up{rounds};
{wall / 60:.0f} min). The page rows are `edgelm bench --device browser` (the bench page: 128-token prompt, greedy
decode): headless desktop Chromium (Debian's), Pixel 7 emulation, wllama {wllama} (llama.cpp in WebAssembly) for
GGUF and onnxruntime-web {ort} (WebAssembly) for ONNX; native = `edgelm bench` (llama.cpp through
llama-cpp-python; onnxruntime-genai), one process per row. **This is desktop x86 Chromium on 2 cores, not a
phone.** "isolated": served with COOP/COEP; without them (`--no-isolation`) the page cannot share memory between
threads and wllama runs one. Page TTFT is the prefill and first token of the run (the page's load is apart). {verdict}.

{md_table(["artifact", "MiB", "threads asked", "isolated", "threads used", "page load s", "page TTFT ms",
           "page decode tok/s", "native TTFT ms", "native decode tok/s", "page / native"], rows)}"""
    update_section(Path(a.docs) / "results.md", "app", body)
    logging.info("wrote %s", Path(a.docs) / "results.md")


if __name__ == "__main__":
    main()
