"""Routing evaluation: the metrics on known cases, and `edgelm route train` / `route eval` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.coop.evaluate import Judged, bootstrap_cpt80, edit_similarity, random_summary, summarize
from edgelm.errors import EdgelmError
from tests.conftest import run_cli
from edgelm.coop.localcloud import LocalCloud


def test_edit_similarity():
    assert edit_similarity("abc", "abc") == 1.0 and edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert edit_similarity("abc", "") == 0.0


def _judged(n: int = 50, seed: int = 0) -> list[Judged]:
    rng = np.random.default_rng(seed)
    dev, gain = rng.random(n) * 0.5, rng.random(n) * 0.5
    return [Judged(f"f{i}", 10, float(d), float(d + g)) for i, (d, g) in enumerate(zip(dev, gain))]


def test_apgr_and_cpt_on_known_orders():
    j = _judged()
    oracle = summarize(j, "oracle", [x.cloud - x.device for x in j])
    worst = summarize(j, "worst", [x.device - x.cloud for x in j])
    rnd = random_summary(j)
    assert oracle.pgr[0] == 0 and oracle.pgr[-1] == pytest.approx(1.0)
    assert oracle.apgr > rnd.apgr > worst.apgr
    assert rnd.apgr == pytest.approx(0.5, abs=0.03) and rnd.cpt80 == pytest.approx(0.8, abs=0.1)
    assert oracle.cpt80 < 0.8 and oracle.cpt50 < oracle.cpt80
    # CPT is the first share at which the recovered gap reaches the target
    k = next(i for i, p in enumerate(oracle.pgr) if p >= 0.8)
    assert oracle.cpt80 == oracle.shares[k]
    # the bootstrap interval holds the figure
    lo, hi = bootstrap_cpt80(j, [x.cloud - x.device for x in j], samples=200)
    rlo, rhi = bootstrap_cpt80(j, np.random.default_rng(1).random(len(j)), samples=200)
    assert lo <= oracle.cpt80 <= hi < rlo <= rhi  # the oracle's interval lies below a random order's


def test_no_gap_is_a_clear_error():
    j = [Judged("f", 1, 0.5, 0.4)] * 4
    with pytest.raises(EdgelmError, match="the cloud is not better than the device"):
        summarize(j, "x", [0, 1, 2, 3])


def test_ridge_recovers_a_linear_signal():
    from edgelm.coop.learn import fit_ridge

    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 6))
    y = X @ np.array([1.0, -2.0, 0, 0, 0.5, 0]) + 0.01 * rng.standard_normal(200)
    m = fit_ridge(X, y, l2=1e-3)
    pred = np.array([m.predict(x) for x in X])
    assert np.corrcoef(pred, y)[0, 1] > 0.999
    with pytest.raises(EdgelmError, match="at least 8 training queries"):
        fit_ridge(X[:3], y[:3])
    # a product of two features needs the pairwise terms
    yq = X[:, 0] * X[:, 1]
    lin, quad = fit_ridge(X, yq, l2=1e-3), fit_ridge(X, yq, l2=1e-3, cols=[0, 1], pairs=[0, 1])
    assert np.corrcoef([quad.predict(x) for x in X], yq)[0, 1] > 0.999
    assert abs(np.corrcoef([lin.predict(x) for x in X], yq)[0, 1]) < 0.5  # linear terms miss it
    assert len(quad.weights) == 2 + 3  # x0, x1, x0^2, x0*x1, x1^2


@pytest.fixture(scope="module")
def trained_cloud(tiny_q_model, tmp_path_factory):
    """The briefly trained tiny model as the cloud; the random-weight model is the device."""
    from edgelm.artifact.api import export

    out = tmp_path_factory.mktemp("cloud-model") / "gguf"
    export(model=str(tiny_q_model), target="gguf", quant="fp32", out=out, check=False)
    srv = LocalCloud(out / "model.gguf", out.parent / "server.log", n_ctx=512)
    yield srv
    srv.stop()


def test_route_train_and_eval(artifacts, trained_cloud, tiny_corpus, tmp_path):
    common = ["--device", str(artifacts["llamacpp"]), "--cloud-url", trained_cloud.url, "--data", str(tiny_corpus),
              "--max-tokens", "8", "--threads", "1", "--no-progress"]
    r = run_cli("route", "train", *common, "--queries", "24", "--out", str(tmp_path / "learned.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((tmp_path / "learned.json").read_text())
    assert state["router"] == "learned" and state["params"]["model"]["weights"] and state["calibration"]["queries"] == 24
    assert state["calibration"]["cloud_quality"] > state["calibration"]["device_quality"]
    assert state["calibration"]["chosen"] in state["calibration"]["cv_spearman"]  # chosen by cross-validation
    r = run_cli("route", "eval", *common, "--queries", "16", "--router-file", str(tmp_path / "learned.json"),
                "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "eval" / "routing.json").read_text())
    names = [s["router"] for s in res["routers"]]
    assert names == ["random", "confidence", "confidence-draft", "learned", "oracle"]
    oracle = res["routers"][-1]
    assert all(s["apgr"] <= oracle["apgr"] + 1e-9 for s in res["routers"])
    assert all(0 <= s["cpt50"] <= s["cpt80"] <= 1 for s in res["routers"])
    assert all(s["cpt80_ci95"][0] <= s["cpt80_ci95"][1] for s in res["routers"][1:4])
    assert "| learned |" in r.stdout and (tmp_path / "eval" / "routing.png").read_bytes()[:4] == b"\x89PNG"
    # the trained router serves
    from edgelm.coop.api import build_runtime

    coop, st = build_runtime(device=str(artifacts["llamacpp"]), cloud_url=trained_cloud.url,
                             router_file=str(tmp_path / "learned.json"), threads=1)
    ans = coop.complete("def f(x):\n    return", max_tokens=4)
    assert ans.router == "learned" and ans.score is not None and ans.routed_to in ("device", "cloud")
    from edgelm.coop.learn import DRAFT_K, FEATURES, PROJ_DIM, features

    assert state["params"]["draft_k"] == DRAFT_K == 16

    ids = coop.device.encode("def f(x):\n    return")
    x, d = features(coop.device, ids)
    f = dict(zip(FEATURES, x))
    assert len(x) == len(FEATURES) + PROJ_DIM and d.ids == coop.device.draft(ids, DRAFT_K).ids
    assert f["draft_tokens"] == len(d.ids) and f["draft_in_prompt"] == pytest.approx(np.mean([t in ids for t in d.ids]))
    assert f["draft_distinct"] == pytest.approx(len(set(d.ids)) / len(d.ids))
    coop.threshold = float("inf")  # the device answers, starting from the router's draft
    for n in (4, 24):  # shorter and longer than the draft
        ans = coop.complete("def f(x):\n    return", max_tokens=n)
        assert ans.routed_to == "device" and ans.text == coop.device.generate("def f(x):\n    return",
                                                                              max_new_tokens=n).text
    # a router file from other features is refused with what to do
    del state["params"]["features"]
    (tmp_path / "old.json").write_text(json.dumps(state))
    with pytest.raises(EdgelmError, match="trained with other features; retrain it"):
        build_runtime(device=str(artifacts["llamacpp"]), cloud_url=trained_cloud.url,
                      router_file=str(tmp_path / "old.json"), threads=1)


def test_route_bad_input(artifacts, tmp_path):
    r = run_cli("route", "train", "--device", str(artifacts["llamacpp"]), "--out", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "pass --cloud-url" in r.stderr
    r = run_cli("serve", "--device", str(artifacts["llamacpp"]), "--cloud-url", "http://127.0.0.1:9/v1",
                "--router", "learned")
    assert r.returncode == 2 and "the learned router is not trained; run `edgelm route train" in r.stderr
    (tmp_path / "bad.json").write_text("{")
    r = run_cli("serve", "--device", str(artifacts["llamacpp"]), "--cloud-url", "http://127.0.0.1:9/v1",
                "--router-file", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "is not a router file" in r.stderr
