"""`edgelm bench --device browser`: the bench page in Debian's chromium (Pixel 7 emulation), the rows posted back to
the CLI's server on 127.0.0.1; DevTools CPU throttling (4x) must read slower than none."""
from __future__ import annotations

import json

import pytest

from edgelm.bench.api import bench
from edgelm.errors import EdgelmError


def _bench_in_browser(browser, tmp_path, models, rate: float, **kw):
    from edgelm.app.browser import bench_in_browser

    out = tmp_path / f"bench-{rate}.json"
    res = bench_in_browser(browser, rate, models=tuple(models), json=str(out), progress=False, wait=120, **kw)
    return res, json.loads(out.read_text())


def test_browser_rows_and_throttling(browser, artifacts, tiny_corpus, tmp_path):
    models = [str(artifacts["llamacpp"]), str(artifacts["onnx"])]
    common = dict(threads=(1,), prompt_len=32, gen_len=16, repeat=2, data=(str(tiny_corpus),))
    fast, data = _bench_in_browser(browser, tmp_path, models, 1, sustained=3, **common)
    (dev,) = data["header"]["devices"]
    assert dev["kind"] == "browser" and "Pixel 7" in dev["user_agent"] and dev["cross_origin_isolated"] is True
    assert dev["cores"] >= 1
    assert [(r["model"], r["runtime"]) for r in fast.rows] == [("gguf", "wllama"), ("onnx", "onnxruntime-web")]
    for r in fast.rows:
        assert not r["error"], r["error"]
        assert r["device"] == dev["id"] and r["threads"] == 1 and r["n_prompt"] == 32 and r["n_gen"] == 16
        assert r["load_s"] > 0 and r["pp_tps_mean"] > 0 and r["tg_tps_mean"] > 0 and r["ttft_ms_mean"] > 0
        assert len(r["tg_tps_runs"]) == 3 and r["avg_ts"] == r["tg_tps_mean"]
        assert r["peak_rss_bytes"] is None and "RSS" in r["notes"]  # a page cannot read it: empty, with the reason
        if r["runtime"] == "wllama":  # its memory is in a worker the browser's measure leaves out: empty, and why
            assert r["page_memory_bytes"] is None and "wllama's WebAssembly memory" in r["notes"]
        else:
            assert r["page_memory_bytes"] > r["size_bytes"], r  # the model is in the page's WebAssembly memory
    # throttled 4x, and served as a plain web host would (no isolation: wllama runs one thread whatever is asked)
    slow, data = _bench_in_browser(browser, tmp_path, models[:1], 4, isolation=False, **{**common, "threads": (2,)})
    (r,) = slow.rows
    assert data["header"]["devices"][0]["cross_origin_isolated"] is False
    assert r["threads"] == 1 and "asked for 2 threads, the runtime runs 1" in r["notes"]
    assert r["tg_tps_mean"] < fast.rows[0]["tg_tps_mean"], (r, fast.rows[0])


def test_browser_refusals(artifacts, tmp_path, monkeypatch):
    out = tmp_path / "b.json"
    with pytest.raises(EdgelmError, match="opened the bench page within 1 s"):
        from edgelm.coop.localcloud import free_port

        bench(models=(str(artifacts["llamacpp"]),), device=f"browser:{free_port()}", wait=1, json=str(out),
              progress=False)
    monkeypatch.delenv("EDGELM_SERVE_API_KEY", raising=False)
    with pytest.raises(EdgelmError, match="set EDGELM_SERVE_API_KEY"):
        bench(models=(str(artifacts["llamacpp"]),), device="browser", host="0.0.0.0", json=str(out), progress=False)
    with pytest.raises(EdgelmError, match="runs gguf, onnx artifacts"):
        bench(models=(str(artifacts["tvm"]),), device="browser", json=str(out), progress=False)
    with pytest.raises(EdgelmError, match="write browser or browser:PORT"):
        bench(models=(str(artifacts["llamacpp"]),), device="browser:x", json=str(out), progress=False)
    assert not out.exists()


def test_the_bench_server_takes_only_planned_rows_with_the_key():
    """What a page may post: with the key, from a browser it planned, rows of planned models with their seconds."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from edgelm.app.benchpage import BrowserDevice
    from edgelm.bench.config import BenchConfig

    dev = BrowserDevice(BenchConfig(models=("m",), device="browser", gen_len=9), 1, "sekrit")
    plan = {"models": ["m"], "gen_len": 9}
    c = TestClient(Starlette(routes=dev._routes(plan)))
    key = {"authorization": "Bearer sekrit"}
    assert c.get("/edgelm-bench/plan").status_code == 401
    bid = c.get("/edgelm-bench/plan", headers=key).json()["browser"]
    assert c.get("/edgelm-bench/plan", headers=key).status_code == 409  # --browsers 1: one only
    timings = {"n_prompt": 4, "prefill_s": [0.5], "ttft_s": [0.6], "decode_s": [2.0], "sustained_decode_s": []}
    row = {"model": "m", "threads": 2, "load_s": 1.0, "timings": timings}
    assert c.post("/edgelm-bench/row", json={"browser": "nobody", "row": row}, headers=key).status_code == 400
    assert c.post("/edgelm-bench/row", json={"browser": bid, "row": {**row, "model": "x"}}, headers=key).status_code == 400
    assert c.post("/edgelm-bench/row", json={"browser": bid, "row": {**row, "timings": {}}}, headers=key).status_code == 400
    assert c.post("/edgelm-bench/row", content=b"x" * (2 << 20), headers=key).status_code == 413
    got = c.post("/edgelm-bench/row", json={"browser": bid, "row": row}, headers=key).json()
    assert (got["pp_tps_mean"], got["tg_tps_mean"], got["ttft_ms_mean"]) == (8.0, 4.0, 600.0)  # edgelm's arithmetic
    assert dev.session.rows[bid] == [got]
    dev.close()
