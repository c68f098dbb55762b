"""The mobile app's speed in headless desktop Chromium (Pixel 7 emulation) against the same GGUF artifacts in
llama.cpp natively on the same machine (writes the `app` section of docs/results.md).

    python benchmarks/app.py                                   # the demo's GGUF artifacts, 1 and 2 threads
    python benchmarks/app.py runs/x/gguf-a runs/x/gguf-b --threads 1,2,4 --tokens 64 --repeat 3
    python benchmarks/app.py runs/x/gguf-a --threads 2 --rounds 5         # a steadier reading: median of 5 rounds

Each artifact is loaded in the page at each thread count, served by `edgelm app serve` (cross-origin isolated, so
wllama may use threads) and, at the largest thread count, also by a plain static server without the isolation
headers (wllama then falls back on one thread). The page answers the same prompt greedily in device mode
`--repeat` times after one warm-up; load time, time to first token and decode tok/s come from the page. With
`--rounds N` every row's page is opened N times, in turn with the other rows, and the row reads the median round:
this machine's speed drifts by 5-10% within minutes, more than one round's answers vary. Native rows
are `edgelm bench` (llama.cpp through llama-cpp-python, one process per row, 128-token prompt). This is desktop x86
Chromium on 2 cores, not a phone. ONNX artifacts run in onnxruntime-web (WebAssembly), natively in onnxruntime-genai.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["gguf-gptq-int4-g32", "gguf-llamacpp-q4_0", "gguf-gptq-int8", "gguf-llamacpp-q8_0", "onnx-gptq-int4-g32"]
PROMPT = '''import os
import sys


def walk(top, topdown=True, onerror=None, followlinks=False):
    """Directory tree generator: yields (dirpath, dirnames, filenames) for each directory under top."""
    stack = [top]
    while stack:
'''


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
    from edgelm.app.browser import AppServer, Browser
    from edgelm.app.build import build_app
    from edgelm.coop.routers import RouterState

    with tempfile.TemporaryDirectory(prefix="edgelm-app-bench-") as tmp:
        RouterState("always-device", float("inf")).save(Path(tmp) / "router.json")  # no calibration needed here
        app = Path(tmp) / "app"
        build = build_app(artifacts=tuple(arts), out=str(app), router=str(Path(tmp) / "router.json"))
        plain = _Static(app)
        try:
            with AppServer(app) as srv, Browser() as browser:
                runs = [(srv.url, t, True) for t in threads] + [(plain.url, max(threads), False)]
                pages = [({"model": m["name"], "mib": m["bytes"] / 2**20, "threads": t, "isolated": isolated,
                           "rounds": []}, f"{url}?model={m['name']}&threads={t}")
                         for m in build.models for url, t, isolated in runs]
                for rnd in range(a.rounds):  # each round opens every row's page afresh
                    for row, url in pages:
                        row["rounds"].append(_measure(browser, url, a))
                        logging.info("round %d: %s", rnd + 1, {**row, "rounds": row["rounds"][-1]})
        finally:
            plain.stop()
    return [_median_of_rounds(row) for row, _ in pages]


def _median_of_rounds(row: dict) -> dict:
    """One row from its rounds: the median of each figure, with the range of the rounds' decode tok/s."""
    rounds = row.pop("rounds")
    ok = [r for r in rounds if not r.get("error")]
    if not ok:
        return {**row, "error": rounds[0]["error"]}  # every round failed: the first one's reason
    by_tps = sorted(ok, key=lambda r: r["tps"])
    mid = by_tps[(len(by_tps) - 1) // 2]  # the (lower) median round: its profile and threads come with it
    return {**row, **mid, "tps": statistics.median(r["tps"] for r in ok),
            "load_s": statistics.median(r["load_s"] for r in ok),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in ok), "tps_rounds": [r["tps"] for r in ok]}


class _Static:
    """A plain static server (no isolation headers), as a web host without them would serve the app."""

    def __init__(self, folder: Path) -> None:
        from edgelm.coop.localcloud import free_port

        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                      "--directory", str(folder)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/"
        time.sleep(1.0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _measure(browser, url: str, a) -> dict:
    seen = browser.step("open", url=url)["seen"]
    if not seen["loaded"]:
        return {"error": seen["error"]}
    runs = [browser.step("run", prompt=PROMPT, maxTokens=a.tokens, mode="device")["seen"]
            for _ in range(a.repeat + 1)][1:]  # the first is a warm-up
    tps = [r["tps"] for r in runs]
    prof = browser.step("profile", prompt=PROMPT, n=a.tokens)["seen"]  # ms per token, by call
    return {"load_s": seen["loadSeconds"], "threads_used": seen["threads"], "profile": prof,
            "ttft_ms": 1e3 * statistics.mean(r["ttft"] for r in runs), "tps": statistics.mean(tps),
            "tps_std": statistics.pstdev(tps), "tokens": statistics.mean(len(r["ids"]) for r in runs)}


def _tps_cell(r: dict) -> str:
    """A row's decode tok/s: mean ± std of one round's answers, or the median and range of several rounds."""
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

    by_name = {Path(p).name: p for p in arts}
    rows = []
    for r in page:
        nat = native.get((by_name[r["model"]], r["threads"] if r["isolated"] else 1), {})
        if r.get("error"):
            rows.append([r["model"], r["mib"], r["threads"], "yes" if r["isolated"] else "no", "", "", "", "", "", "",
                         f"failed: {r['error']}"])
            continue
        n_tps = nat.get("tg_tps_mean")
        rows.append([r["model"], r["mib"], r["threads"], "yes" if r["isolated"] else "no", r["threads_used"],
                     r["load_s"], r["ttft_ms"], _tps_cell(r),
                     nat.get("ttft_ms_mean", ""), n_tps or "", f"{r['tps'] / n_tps:.2f}" if n_tps else ""])
    calls = ("decode", "sample", "detokenize", "top_n")
    prof_rows = [[r["model"], r["threads_used"], *(r["profile"][k] for k in calls)]
                 for r in page if r.get("profile") and r["isolated"]]
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

Command: `{cmd.strip()}` on {platform.machine()} ({a.repeat} answers of {a.tokens} tokens per row after a
warm-up{rounds};
{wall / 60:.0f} min). Headless desktop Chromium (Debian's), Pixel 7 emulation, wllama {wllama} (llama.cpp in
WebAssembly) for GGUF and onnxruntime-web {ort} (WebAssembly) for ONNX, in device mode; native = `edgelm bench`
(llama.cpp through llama-cpp-python; onnxruntime-genai), one process per row. **This is
desktop x86 Chromium on 2 cores, not a phone.** "isolated": served with COOP/COEP (`edgelm app serve`); without
them the page cannot share memory between threads and wllama runs one. {verdict}.

{md_table(["artifact", "MiB", "threads asked", "isolated", "threads used", "page load s", "page TTFT ms",
           "page decode tok/s", "native TTFT ms", "native decode tok/s", "page / native"], rows)}
Where a GGUF page token's time goes (ms per token, each wllama call timed alone over {a.tokens} tokens):
`llama_decode` is the model itself in WebAssembly; the device answer then takes the greedy sampler's token and its
bytes; the top-5 softmax over the 49,152-word vocabulary is paid only for the auto mode's 8 draft tokens.

{md_table(["artifact", "threads", "llama_decode", "greedy sample", "detokenize", "top-5 log-probs"], prof_rows)}"""
    update_section(Path(a.docs) / "results.md", "app", body)
    logging.info("wrote %s", Path(a.docs) / "results.md")


if __name__ == "__main__":
    main()
