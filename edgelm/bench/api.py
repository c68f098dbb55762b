"""``edgelm.bench``: plan rows (model x runtime x threads), run each in a fresh process, write table/JSON/CSV/plot.

JSON schema ``edgelm-bench/1`` (docs/bench_schema.md): {"schema", "header": {machine, cpu, cores, memory, python,
libraries, edgelm_version, created, config}, "rows": [row, ...]}; a row's fields are ROW_FIELDS.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.bench.config import BenchConfig
from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

SCHEMA = "edgelm-bench/1"
# Every row has these keys (None where not measured). Units are in the names.
ROW_FIELDS = ("model", "path", "format", "preset", "device", "runtime", "threads", "size_bytes", "load_s",
              "pp_tps_mean", "pp_tps_std", "tg_tps_mean", "tg_tps_std", "ttft_ms_mean", "ttft_ms_std",
              "peak_rss_bytes", "page_memory_bytes", "tg_tps_runs", "ppl", "ppl_ref", "dppl", "kld", "top1_agree",
              "overhead_ms_per_token", "overhead_pct", "reference", "notes", "error",
              # llama-bench's names for the same figures (avg_ts/stddev_ts: decode, its tg test)
              "n_prompt", "n_gen", "n_threads", "model_size", "test_time", "cpu_info", "avg_ts", "stddev_ts")


@dataclass
class BenchResult:
    header: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "header": self.header, "rows": self.rows}

    def table(self) -> str:
        """The rows as a Markdown table (quality and overhead columns only when measured)."""
        from edgelm.report import md_table

        def f(v: Any, fmt: str) -> str:
            return "" if v is None else format(v, fmt)

        quality = any(r.get("kld") is not None for r in self.rows)
        overhead = any(r.get("overhead_pct") is not None for r in self.rows)
        devices = any(r.get("device") not in (None, "local") for r in self.rows)
        page = any(r.get("page_memory_bytes") is not None for r in self.rows)
        sustained = any(r.get("tg_tps_runs") for r in self.rows)
        heads = ["model", "preset", *(["device"] if devices else []), "runtime", "threads", "MiB", "pp t/s",
                 "tg t/s", "TTFT ms", "peak RSS MiB", *(["page MiB"] if page else []),
                 *(["sustained tg t/s (first → last, min)"] if sustained else [])]
        heads += ["ppl", "ΔPPL", "KLD", "top-1 agree"] if quality else []
        heads += ["overhead/token"] if overhead else []
        heads += ["error"]
        rows = []
        for r in self.rows:
            row = [r["model"], r.get("preset") or "", *([r.get("device") or ""] if devices else []),
                   r.get("runtime") or "", f(r.get("threads"), "d"),
                   f(r["size_bytes"] / 2**20 if r.get("size_bytes") else None, ".1f"),
                   _pm(r, "pp_tps", ".1f"), _pm(r, "tg_tps", ".1f"), _pm(r, "ttft_ms", ".1f"),
                   f(r["peak_rss_bytes"] / 2**20 if r.get("peak_rss_bytes") else None, ".0f")]
            if page:
                row += [f(r["page_memory_bytes"] / 2**20 if r.get("page_memory_bytes") else None, ".0f")]
            if sustained:
                t = r.get("tg_tps_runs") or []
                row += [f"{t[0]:.1f} → {t[-1]:.1f}, {min(t):.1f}" if t else ""]
            if quality:
                row += [f(r.get("ppl"), ".3f"), f(r.get("dppl"), "+.3f"), f(r.get("kld"), ".4f"),
                        f(r.get("top1_agree"), ".3f")]
            if overhead:
                row += [f(r.get("overhead_pct"), "+.1f") + ("%" if r.get("overhead_pct") is not None else "")]
            row += [r.get("error") or ""]
            rows.append(row)
        return md_table(heads, rows)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k) for k in ROW_FIELDS})
        return buf.getvalue()


def _pm(r: dict[str, Any], key: str, fmt: str) -> str:
    m, s = r.get(f"{key}_mean"), r.get(f"{key}_std")
    return "" if m is None else f"{format(m, fmt)} ± {format(s or 0.0, fmt)}"


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from edgelm import __version__
    from edgelm.runtimes.base import physical_cores

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    libs = {}
    for name in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "llama-cpp-python", "apache-tvm", "numpy"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            pass
    return {"machine": platform.machine(), "system": platform.platform(), "cpu": cpu, "logical_cores": os.cpu_count(),
            "physical_cores": physical_cores(), "memory_bytes": mem, "python": platform.python_version(),
            "libraries": libs, "edgelm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def plan(config: BenchConfig) -> list[dict[str, Any]]:
    """One row spec per model x runtime x threads; a model that can't be opened becomes an error row."""
    from edgelm.registry import RUNTIMES
    from edgelm.runtimes.api import DEFAULT_RUNTIME, artifact_format

    rows: list[dict[str, Any]] = []
    for model in config.models:
        base = {"model": Path(model).name or model, "path": model}
        try:
            fmt, manifest = artifact_format(model)
        except EdgelmError as e:
            rows.append({**base, "error": str(e)})
            continue
        m = manifest or {}
        base.update(format=fmt, preset=(m.get("preset") or {}).get("name") or ("fp32" if fmt == "hf" else None),
                    reference=config.reference or (m.get("parity") or {}).get("reference") or (m.get("source") or {}).get("spec"))
        if fmt == "hf" and not config.reference:
            base["reference"] = model
        names = list(config.runtimes) or [DEFAULT_RUNTIME[fmt]]
        for name in names:
            try:
                cls = RUNTIMES.get(name)
            except EdgelmError as e:
                rows.append({**base, "runtime": name, "error": str(e)})
                continue
            if fmt not in cls.formats:
                if not config.runtimes or len(names) == 1:
                    rows.append({**base, "runtime": name, "error": f"runtime {name} cannot open a {fmt} model"})
                continue
            for t in config.threads or (None,):
                rows.append({**base, "runtime": name, "threads": t})
    return rows


def _run_worker(spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """Run one worker process; its result dict, or {"error": ...} with the reason it failed."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", dir=work)
    os.close(fd)
    out_path = spec_path.replace(".json", ".out.json")
    Path(spec_path).write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}  # the worker imports the installed edgelm
    try:
        r = subprocess.run([sys.executable, "-m", "edgelm.bench.worker", spec_path, out_path], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--timeout)"}
    if r.returncode != 0 or not Path(out_path).is_file():
        lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
        return {"error": f"worker exited {r.returncode}: {lines[-1][:300] if lines else 'no output'}"}
    return json.loads(Path(out_path).read_text(encoding="utf-8"))


def bench(config: BenchConfig | None = None, **kwargs: Any) -> BenchResult:
    """Benchmark ``config.models`` on ``config.device`` (this machine by default); see BenchConfig for the knobs.
    Writes --json/--csv/--plot when given, and only when the run got that far (a refused device writes nothing)."""
    from dataclasses import replace

    from edgelm.bench.devices import open_device

    config = replace(config or BenchConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    config.validate()
    specs = plan(config)
    header = {**machine_info(), "config": config.as_dict()}
    if config.dry_run or all(s.get("error") for s in specs):  # nothing to run: no device is reached
        header["devices"] = []
        result = BenchResult(header=header, rows=[{k: s.get(k) for k in ROW_FIELDS} for s in specs])
        if not config.dry_run:
            write_outputs(result, config)
        return result
    with open_device(config) as device:
        device.check(specs)  # refuses, in one line, what the device cannot run (before anything is pushed)
        rows = device.run(specs, config)
        header["devices"] = device.facts()
    result = BenchResult(header=header, rows=[finish_row(r, header["devices"], config) for r in rows])
    write_outputs(result, config)
    return result


def finish_row(row: dict[str, Any], devices: list[dict[str, Any]], config: BenchConfig) -> dict[str, Any]:
    """Every field present, and llama-bench's names filled from edgelm's (LLAMA_BENCH_FIELDS), so dashboards that
    read llama-bench's JSON read these rows too."""
    out = {k: row.get(k) for k in ROW_FIELDS}
    facts = next((d for d in devices if d.get("id") == out["device"]), devices[0] if devices else {})
    out["device"] = out["device"] or facts.get("id")
    out["cpu_info"] = out["cpu_info"] or facts.get("cpu")
    if not out.get("error"):
        out["n_prompt"] = out["n_prompt"] or config.prompt_len
        out["n_gen"] = out["n_gen"] or config.gen_len
        out["n_threads"], out["model_size"] = out["threads"], out["size_bytes"]
        out["avg_ts"], out["stddev_ts"] = out["tg_tps_mean"], out["tg_tps_std"]
    return out


def write_outputs(result: BenchResult, config: BenchConfig) -> None:
    from edgelm.fsutil import atomic_write_json, atomic_write_text

    if config.json:
        atomic_write_json(config.json, result.as_dict())
    if config.csv:
        atomic_write_text(config.csv, result.csv())
    if config.plot:
        from edgelm.report import plot_bench

        plot_bench(result.rows, Path(config.plot))


class DecodeSpeeds:
    """Decode tok/s of artifacts, measured by :func:`bench` (one process per row) and kept in a JSON file by
    resolved path and thread count, so that a benchmark rerun measures only what is missing (speed wants a quiet
    machine; quality does not)."""

    def __init__(self, cache: str | Path, *, reuse: bool = True) -> None:
        self.cache = Path(cache)
        self.tps: dict[str, float] = json.loads(self.cache.read_text()) if reuse and self.cache.is_file() else {}

    @staticmethod
    def key(path: str | Path, threads: int) -> str:
        return f"{Path(path).resolve()}|{threads}"

    def measure(self, paths: list[str], threads: tuple[int, ...], repeat: int = 3) -> None:
        """Bench every path not yet measured at some thread count (at all of them: one bench run), and save; a
        figure already kept stays as it was."""
        todo = [p for p in paths if any(self.key(p, t) not in self.tps for t in threads)]
        if not todo:
            return
        res = bench(BenchConfig(models=tuple(todo), threads=tuple(threads), repeat=repeat, progress=False))
        for r in res.rows:
            if r.get("tg_tps_mean"):
                self.tps.setdefault(self.key(r["path"], r["threads"]), r["tg_tps_mean"])
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        self.cache.write_text(json.dumps(self.tps, indent=1))

    def __call__(self, path: str | Path, threads: int) -> float | None:
        return self.tps.get(self.key(path, threads))
