"""Soak of `edgelm serve` on 127.0.0.1: concurrent clients, mixed stream and non-stream, for minutes, with the cloud
behind the tests' fault proxy cycling through refusals, 5xx, stalls, malformed JSON and cut streams.

Reports requests served, 503s, p50/p99 latency, the server's RSS and open file descriptors over time, and checks
that every request got a well-formed answer or a well-formed error (none lost, none left hanging). Writes the
`soak` section of docs/results.md.

    python benchmarks/soak.py --device runs/demo/export/gguf-gptq-int4-g32 --minutes 10
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAULTS = ("pass", "500", "reset", "slow", "cut", "malformed", "pass")  # cycled, one every --fault-every seconds


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def well_formed(r, stream: bool) -> str:
    """"ok", "503" or what was wrong with the answer."""
    if r.status_code == 503:
        return "503" if r.json().get("error", {}).get("type") == "overloaded" else "bad 503 body"
    if r.status_code != 200:
        return f"http {r.status_code}"
    if not stream:
        body = r.json()
        return "ok" if body["choices"][0]["message"]["content"] is not None and "edgelm" in body else "bad body"
    events = [e for e in r.text.split("\n\n") if e.strip()]
    if not events or events[-1] != "data: [DONE]":
        return "stream without [DONE]"
    for e in events[:-1]:
        obj = json.loads(e[5:])
        if "error" in obj:
            return "stream error event"
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", required=True, help="a GGUF artifact folder (the device, and the cloud's model)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--fault-every", type=float, default=5.0, help="seconds between fault mode changes")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import httpx

    from edgelm.coop.localcloud import FaultProxy, LocalCloud, free_port, wait_http
    from edgelm.report import md_table, update_section

    work = Path(a.docs).parent / "runs" / "soak"
    work.mkdir(parents=True, exist_ok=True)
    cloud = LocalCloud(Path(a.device) / "model.gguf", work / "cloud.log", n_ctx=512)
    proxy = FaultProxy(cloud.port)
    proxy.delay = 4.0  # "slow": past the first-token deadline
    port = free_port()
    log_path = work / "serve.log"
    with open(log_path, "w") as log_f:
        srv = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", "--device", a.device, "--cloud-url",
                                proxy.url, "--router", "always-cloud", "--deadline", "2", "--max-queue", "8",
                                "--threads", "1", "--port", str(port)], stdout=log_f, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    outcomes: dict[str, int] = {}
    lat: list[float] = []
    samples: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    t_end = time.monotonic() + 60 * a.minutes
    try:
        wait_http(f"{url}/health", timeout=180, proc=srv)

        def client(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(timeout=120) as c:
                while time.monotonic() < t_end:
                    stream = rng.random() < 0.5
                    body = {"messages": [{"role": "user", "content": f"def f{rng.randrange(10**6)}(x):"}],
                            "max_tokens": a.max_tokens, "stream": stream}
                    t0 = time.perf_counter()
                    try:
                        r = c.post(f"{url}/v1/chat/completions", json=body)
                        what = well_formed(r, stream)
                    except httpx.TimeoutException:
                        what = "hung (client timeout)"
                    except Exception as e:  # noqa: BLE001 - counted as what it is
                        what = f"client error {type(e).__name__}"
                    with lock:
                        outcomes[what] = outcomes.get(what, 0) + 1
                        lat.append(time.perf_counter() - t0)
                    if what == "503":
                        time.sleep(0.2)  # a client backs off when told to

        def faults() -> None:
            k = 0
            while time.monotonic() < t_end:
                proxy.mode = FAULTS[k % len(FAULTS)]
                k += 1
                time.sleep(a.fault_every)
            proxy.mode = "pass"

        def sampler() -> None:
            t0 = time.monotonic()
            while time.monotonic() < t_end:
                rss, fds = proc_stats(srv.pid)
                samples.append((time.monotonic() - t0, rss, fds))
                time.sleep(10)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        threads += [threading.Thread(target=faults), threading.Thread(target=sampler)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss, fds = proc_stats(srv.pid)
        samples.append((60 * a.minutes, rss, fds))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        srv.terminate()
        srv.wait(30)
        proxy.stop()
        cloud.stop()
    log_text = log_path.read_text(errors="replace")
    total = sum(outcomes.values())
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    warm = [s for s in samples if s[0] >= 60] or samples  # after the first minute (model load, allocator warm-up)
    fallbacks = {ln.split('reason="')[1].split('"')[0]: float(ln.split()[-1]) for ln in metrics.splitlines()
                 if ln.startswith("edgelm_fallbacks_total{")}
    rows = [["requests", str(total)], ["well-formed answers (200)", str(outcomes.get("ok", 0))],
            ["503 (queue full, error JSON)", str(outcomes.get("503", 0))],
            ["anything else", str(total - outcomes.get("ok", 0) - outcomes.get("503", 0))],
            ["latency p50 / p99", f"{q(0.5):.2f} s / {q(0.99):.2f} s"],
            ["device answers after a cloud fault", ", ".join(f"{k} {v:.0f}" for k, v in sorted(fallbacks.items()))],
            ["server RSS: after 1 min, end, max", f"{warm[0][1]:.0f}, {samples[-1][1]:.0f}, "
                                                  f"{max(s[1] for s in samples):.0f} MiB"],
            ["open fds: after 1 min, end, max", f"{warm[0][2]}, {samples[-1][2]}, {max(s[2] for s in samples)}"],
            ["tracebacks in the server log", str(log_text.count("Traceback"))]]
    other = {k: v for k, v in outcomes.items() if k not in ("ok", "503")}
    body = (f"## Soak of `edgelm serve` under cloud faults (`benchmarks/soak.py`)\n\n"
            f"`python benchmarks/soak.py --device {a.device} --minutes {a.minutes:g} --clients {a.clients}` on "
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores): {a.clients} clients for "
            f"{a.minutes:g} minutes, half streamed, {a.max_tokens} tokens each, `--router always-cloud "
            f"--deadline 2 --max-queue 8`; the fault proxy in front of the cloud cycles "
            f"{', '.join(FAULTS)} every {a.fault_every:g} s.\n\n" + md_table(["", ""], rows)
            + ("\nOther outcomes: " + json.dumps(other) + "\n" if other else "")
            + "\nRSS and fds sampled every 10 s: " + ", ".join(f"{t:.0f}s {r:.0f}MiB/{f}" for t, r, f in samples[::6])
            + "\n")
    print(body)
    update_section(Path(a.docs) / "results.md", "soak", body)
    return 0 if not other and "Traceback" not in log_text else 1


if __name__ == "__main__":
    sys.exit(main())
