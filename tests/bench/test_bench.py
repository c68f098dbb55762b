"""`edgelm bench`: one table over artifacts and runtimes, JSON/CSV/plot with a stable schema, failures per row."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from edgelm.bench.api import ROW_FIELDS, SCHEMA
from tests.conftest import run_cli

SMALL = ["--prompt-len", "16", "--gen-len", "8", "--repeat", "2", "--no-progress"]


def test_bench_every_backend_with_quality(artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["onnx"], broken)
    (broken / "tokenizer.json").write_text("{}")  # sha256 no longer matches
    models = [str(artifacts[b]) for b in ("llamacpp", "onnx", "torch")] + [str(broken), str(tmp_path / "missing")]
    out = tmp_path / "b"
    r = run_cli("bench", *models, *SMALL, "--threads", "1", "--quality", "--eval-seqs", "2", "--eval-seqlen", "32",
                "--overhead", "--sustained", "2", "--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png", timeout=900)
    assert r.returncode == 0, r.stderr
    assert ("| model | preset | runtime | threads | MiB | pp t/s | tg t/s | TTFT ms | peak RSS MiB | sustained tg t/s "
            "(first → last, min) | ppl") in r.stdout
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["schema"] == SCHEMA
    h = doc["header"]
    assert {"cpu", "physical_cores", "memory_bytes", "libraries", "edgelm_version", "config"} <= set(h)
    assert h["config"]["gen_len"] == 8 and "llama-cpp-python" in h["libraries"]
    (dev,) = h["devices"]  # --device local (the default): this machine
    assert dev["id"] == "local" and dev["cpu"] == h["cpu"] and dev["logical_cores"] == h["logical_cores"]
    rows = doc["rows"]
    assert [r["runtime"] for r in rows[:3]] == ["llamacpp", "onnx", "torch"]
    for row in rows[:3]:
        assert set(row) == set(ROW_FIELDS) and not row["error"], row
        assert row["threads"] == 1 and row["tg_tps_mean"] > 0 and row["tg_tps_std"] >= 0 and row["pp_tps_mean"] > 0
        assert row["ttft_ms_mean"] > 0 and row["peak_rss_bytes"] > 0 and row["size_bytes"] > 0
        assert row["kld"] < 1e-3 and abs(row["dppl"]) < 0.01 * row["ppl_ref"]  # fp32 artifacts of the reference
        assert row["overhead_pct"] is not None and row["device"] == "local" and row["test_time"]
        assert len(row["tg_tps_runs"]) == 2 and min(row["tg_tps_runs"]) > 0
        assert (row["n_prompt"], row["n_gen"], row["avg_ts"], row["model_size"]) == (
            h["config"]["prompt_len"], 8, row["tg_tps_mean"], row["size_bytes"])
    torch_row = rows[2]
    assert torch_row["kld"] == 0 and torch_row["top1_agree"] == 1  # the reference itself
    assert "does not match the sha256" in rows[3]["error"] and "does not exist" in rows[4]["error"]
    with open(tmp_path / "b.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(ROW_FIELDS) and len(table) == 5
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("threads", [["1", "2"], ["1,2"], ["1,", "2"]])
def test_dry_run_lists_a_thread_sweep(artifacts, tmp_path, threads):
    r = run_cli("bench", str(artifacts["llamacpp"]), str(artifacts["torch"]), "--threads", *threads, "--runtimes",
                "llamacpp", "torch", "--dry-run", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 0, r.stderr
    lines = [ln.strip() for ln in r.stdout.splitlines()[1:]]
    # the GGUF on both runtimes that open it, the HF folder on torch only; each at 1 and 2 threads
    assert lines == [f"{artifacts['llamacpp'].name}: {rt}, threads {t}" for rt in ("llamacpp", "torch") for t in (1, 2)] + \
                    [f"{artifacts['torch'].name}: torch, threads {t}" for t in (1, 2)]
    assert not (tmp_path / "x.json").exists()


def test_bad_bench_input(tmp_path, artifacts):
    for flags, msg in ((["--threads", "0"], "--threads must be whole numbers >= 1, got 0"),
                       (["--threads", "1,x"], "argument --threads: invalid int value: '1,x'"),
                       (["--gen-len", "1"], "--gen-len must be >= 2"),
                       ([], None)):
        args = [str(artifacts["onnx"])] if flags else []
        r = run_cli("bench", *args, *flags, "--dry-run")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert (msg or "nothing to benchmark") in r.stderr


def test_every_row_failing_is_a_failed_run(tmp_path):
    r = run_cli("bench", str(tmp_path / "missing"), *SMALL)
    assert r.returncode == 1 and "does not exist" in r.stdout


def test_decode_speeds_measure_only_what_is_missing(artifacts, tmp_path):
    from edgelm.bench.api import DecodeSpeeds

    cache = tmp_path / "speed.json"
    onnx = str(artifacts["onnx"])
    cache.write_text(json.dumps({DecodeSpeeds.key(onnx, 1): 123.0}))
    speeds = DecodeSpeeds(cache)
    speeds.measure([onnx], (1,), repeat=1)  # already there: nothing runs, nothing changes
    assert speeds(onnx, 1) == 123.0 and speeds(onnx, 2) is None
    speeds.measure([onnx], (1, 2), repeat=1)  # 2 threads is missing: measured and kept
    assert speeds(onnx, 1) == 123.0 and speeds(onnx, 2) > 0
    assert DecodeSpeeds(cache)(onnx, 2) == speeds(onnx, 2) and DecodeSpeeds(cache, reuse=False)(onnx, 1) is None
