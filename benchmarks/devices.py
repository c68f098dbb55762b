"""The same artifacts on every `edgelm bench --device` kind this machine can offer (writes the `devices` section of
docs/results.md):

    python benchmarks/devices.py                 # the demo's all-Q4_0 GGUF, its ONNX and TVM exports
    python benchmarks/devices.py --threads 1,2 --sustained 5

- local: this machine, each runtime in its own process (the default device);
- browser: Debian's chromium as a Pixel 7 (playwright-core), the bench page served by the CLI, without and with
  DevTools CPU throttling (4x) - **emulation**, not a phone's figures;
- ssh://127.0.0.1: a throwaway OpenSSH server on this machine: llama.cpp's llama-bench (x86_64) and the TVM runner
  under this venv's Python, pushed and run over ssh;
- qemu-aarch64: the aarch64 llama-bench and the aarch64 TVM library (in the arm64 root's Python) under qemu-user -
  **emulation**, which checks the aarch64 builds run, not an aarch64 CPU's speed;
- rpc://127.0.0.1: a TVM RPC server under qemu-aarch64, the aarch64 library uploaded and timed over TVM's RPC.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "runs" / "demo" / "export"
GGUF, ONNX, TVM = EXPORT / "gguf-gptq-int4-g32-all", EXPORT / "onnx-gptq-int4-g32", EXPORT / "tvm-gptq-int4-g32"
QUANTIZED = EXPORT / "quantized-gptq-int4-g32"  # TVM's checkpoint, exported again for aarch64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="2", help="thread counts (default: 2)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sustained", type=int, default=3, help="decode runs in a row on the non-emulated devices")
    p.add_argument("--root", default=str(ROOT / "build" / "arm64-root"), help="the arm64 root (make tvm-aarch64)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-devices"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--only", default="", help="rerun only the devices whose label contains this (local, browser, "
                                              "ssh, qemu, rpc); the others' rows come from OUT/rows.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from edgelm.app.browser import Browser, bench_in_browser, browser_missing
    from edgelm.artifact.api import export
    from edgelm.bench.api import bench
    from edgelm.bench.loopback import LoopbackRpc, LoopbackSshd

    for art in (GGUF, ONNX, TVM, QUANTIZED):
        if not (art / "edgelm.json").is_file():
            sys.exit(f"error: {art} is missing; run `make demo` first")
    why = browser_missing()
    if why:
        sys.exit(f"error: {why}")
    tvm_arm = Path(a.out) / "tvm-gptq-int4-g32-aarch64"
    if not (tvm_arm / "edgelm.json").is_file():
        export(model=str(QUANTIZED), target="tvm", quant="gptq-int4-g32", arch="aarch64", out=str(tvm_arm), force=True)
    threads = tuple(int(t) for t in a.threads.split(","))
    common = dict(prompt_len=a.prompt_len, gen_len=a.gen_len, repeat=a.repeat, threads=threads, progress=False)
    kept = Path(a.out) / "rows.json"  # each device's rows, so that --only reruns one and the section keeps the rest
    runs: dict[str, list[dict]] = json.loads(kept.read_text()) if a.only and kept.is_file() else {}
    t0 = time.perf_counter()

    def want(label: str) -> bool:
        return not a.only or a.only in label

    def add(label: str, res) -> None:
        runs[label] = res.rows
        kept.write_text(json.dumps(runs, indent=1))
        logging.info("%s\n%s", label, res.table())

    if want("local"):
        add("local", bench(models=(str(GGUF), str(ONNX), str(TVM)), sustained=a.sustained, **common))
    if want("browser"):
        with Browser() as browser:
            for rate in (1, 4):
                add(f"browser, Pixel 7 emulation, CPU throttling {rate}x",
                    bench_in_browser(browser, rate, models=(str(GGUF), str(ONNX)), sustained=a.sustained, **common))
    if want("ssh"):
        with tempfile.TemporaryDirectory(prefix="edgelm-bench-devices-") as tmp, \
                LoopbackSshd(Path(tmp) / "sshd") as d:
            add("ssh://127.0.0.1 (this machine through sshd)",
                bench(models=(str(GGUF), str(TVM)), device=d.spec, ssh_config=d.config,
                      remote_dir=str(Path(tmp) / "dev"), device_python=sys.executable, sustained=a.sustained, **common))
    emulated = {**common, "repeat": 1, "gen_len": min(a.gen_len, 16)}  # tens of times slower: one short run
    if want("qemu"):
        add("qemu-aarch64 (emulation)", bench(models=(str(GGUF), str(tvm_arm)), device="qemu-aarch64",
                                              qemu_root=a.root, **emulated))
    if want("rpc"):
        with LoopbackRpc.qemu_aarch64(a.root) as rpc:
            add("rpc://127.0.0.1 (a TVM RPC server under qemu-aarch64: emulation)",
                bench(models=(str(tvm_arm),), device=rpc.spec, **emulated))
    _write(a, list(runs.items()), time.perf_counter() - t0)


def _write(a, runs: list[tuple[str, list[dict]]], wall: float) -> None:
    import platform

    from edgelm.bench.api import machine_info
    from edgelm.report import md_table, update_section

    def f(v, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    rows = []
    for label, got in runs:
        for r in got:
            mem = r.get("peak_rss_bytes") or r.get("page_memory_bytes")
            kind = "RSS" if r.get("peak_rss_bytes") else "page" if r.get("page_memory_bytes") else ""
            sus = r.get("tg_tps_runs") or []
            rows.append([label, r["model"], r.get("runtime") or "", f(r.get("threads"), "d"),
                         f(r.get("load_s"), ".2f"), f(r.get("pp_tps_mean"), ".1f"), f(r.get("tg_tps_mean"), ".1f"),
                         f(r.get("ttft_ms_mean"), ".0f"), f"{mem / 2**20:.0f} ({kind})" if mem else "",
                         " → ".join(f"{t:.1f}" for t in sus), r.get("error") or ""])
    cpu = machine_info()["cpu"]
    cmd = "python benchmarks/devices.py " + shlex.join(sys.argv[1:])
    body = f"""## The same artifacts on every device kind (`benchmarks/devices.py`)

Command: `{cmd.strip()}` on {platform.machine()} ({cpu}, 2 cores); {wall / 60:.0f} min. Prompt {a.prompt_len} tokens,
{a.gen_len} generated, {a.repeat} runs per row after a warm-up (mean; the emulated rows: one run of
{min(a.gen_len, 16)}); "sustained" is `--sustained`: decode runs back to back, in order. llama-bench's rows
prefill from an empty context and decode after the prompt (`-d {a.prompt_len}`), as edgelm's do. Artifacts: the demo student's all-Q4_0 GGUF (`gguf-gptq-int4-g32-all`), its GPTQ int4 ONNX
and TVM exports, and the same TVM checkpoint exported for aarch64. Every row is `edgelm bench --device ...` with
the same fields (`edgelm-bench/1` JSON, docs/bench_schema.md); a cell is empty where that device or runner cannot
measure it, and the row's `notes` in the JSON say why (llama-bench times no load and no first token; a page
cannot read its RSS, and Chromium's `measureUserAgentSpecificMemory` leaves out wllama's worker memory; TVM's
RPC reports no memory). **Emulation rows are not device figures**: the browser rows are desktop Chromium on this
x86 CPU with a phone's screen and user agent, throttled by DevTools; the qemu rows run aarch64 code translated
instruction by instruction, tens of times slower than any aarch64 CPU; they show that the aarch64 builds run
and give the same row shape.

{md_table(["device", "artifact", "runtime", "threads", "load s", "pp t/s", "tg t/s", "TTFT ms", "memory MiB",
           "sustained tg t/s", "error"], rows)}"""
    update_section(Path(a.docs) / "results.md", "devices", body)
    logging.info("wrote %s", Path(a.docs) / "results.md")


if __name__ == "__main__":
    main()
