"""The app in Debian's chromium as a Pixel 7: greedy tokens equal edgelm's Python runtime on the same GGUF, the
router's score equals the Python router's, the cloud answers through the proxy and the device takes over when it
fails, private queries make no cloud request, a reload offline still answers, and bad input gets a message."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from edgelm.app.browser import DEMO, AppServer
from tests.app.conftest import SHOTS
from tests.cloud_fixtures import FaultProxy
from tests.runtime_fixtures import EMOJI, LONG, PROMPT

N = 16  # tokens per answer


def test_device_answer_is_pythons_greedy(browser, app_url, runtimes, rt_model):
    seen = browser.step("open", url=app_url)["seen"]
    assert seen["loaded"] and not seen["error"], seen
    out = browser.step("run", prompt=PROMPT, maxTokens=N, mode="device")
    page = out["seen"]
    py = runtimes["llamacpp"].greedy(rt_model["prompt_ids"], N)
    assert page["side"] == "device" and page["reason"] == "device mode", json.dumps(page)
    assert page["ids"] == py
    assert page["text"] == runtimes["llamacpp"].decode(py)
    assert LONG in page["text"] and EMOJI in page["text"]  # the 41-byte token and the emoji split over 4 tokens
    assert out["v1_requests"] == 0 and page["tps"] > 0 and page["ttft"] > 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.step("screenshot", path=str(SHOTS / "app-pixel7.png"))
    assert (SHOTS / "app-pixel7.png").stat().st_size > 10_000


def test_auto_mode_scores_like_the_python_router(browser, app_url, app_dir, runtimes, rt_model):
    from edgelm.coop.routers import router_from_state, RouterState

    browser.step("open", url=app_url)
    page = browser.step("run", prompt=PROMPT, maxTokens=N, mode="auto")["seen"]
    route = json.loads((app_dir / "app.json").read_text())["models"][0]["route"]
    router = router_from_state(RouterState(route["router"], route["threshold"], params=route["params"]))
    py = router.score(runtimes["llamacpp"], rt_model["prompt_ids"]).score
    assert route["router"] == "confidence-topn"
    assert page["score"] == pytest.approx(py, abs=1e-4)
    assert page["side"] == ("cloud" if page["score"] > route["threshold"] else "device")
    assert f"threshold {route['threshold']:.3f}" in page["reason"]


def test_router_formula_and_privacy_rules_match_python():
    """router.js's topEntropy and privacy guard against edgelm.metrics and edgelm.coop.privacy, in node."""
    from edgelm.coop.privacy import PrivacyGuard, detector_table
    from edgelm.metrics import top_entropy

    steps = [[-0.01, -5.2, -6.0], [-1.3, -1.4, -2.9, -3.3, -7.5], [-0.0]]
    texts = ["mail bob@example.com", "call +1 415 555 0100", "card 4111 1111 1111 1111", "card 4111 1111 1111 1112",
             "key sk-abcdefghijklmnop1234", "def f(x):\n    return x", "(415) 555-0100", "v1.2.3-4"]
    script = f"""
import {{ topEntropy, makeGuard }} from '{(DEMO / "www" / "router.js").as_posix()}';
const g = makeGuard({json.dumps(detector_table())});
const flags = {json.dumps(texts)}.map((t) => g.flags(t));
console.log(JSON.stringify({{ h: topEntropy({json.dumps(steps)}), flags }}));
"""
    r = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["h"] == pytest.approx(top_entropy(steps), abs=1e-12)
    assert out["flags"] == [PrivacyGuard().flags(t) for t in texts]
    assert out["flags"][0] == ["email"] and out["flags"][3] == [] and out["flags"][5] == []


def test_cloud_answers_through_the_proxy(browser, app_url, cloud, cloud_proxy):
    import httpx

    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    httpx.post(f"{cloud.url}/completions", json=body, timeout=60)  # same prompt first: see direct_chat
    cloud_proxy.mode = "pass"
    browser.step("open", url=app_url)
    out = browser.step("run", prompt=PROMPT, maxTokens=8, mode="cloud")
    want = httpx.post(f"{cloud.url}/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert out["seen"]["side"] == "cloud" and out["seen"]["reason"] == "cloud mode", out
    assert out["seen"]["text"] == want and want
    assert out["v1_requests"] == 1 and "cloud · cloud mode" in out["seen"]["badge"]


# a cloud 500 reaches the page as app serve's 502 (a gateway's failure), whose message names the cloud's status
@pytest.mark.parametrize("mode, reason", [("500", "http_502"), ("malformed", "malformed")])
def test_cloud_failure_falls_back_on_the_device(browser, app_url, cloud_proxy, runtimes, rt_model, mode, reason):
    cloud_proxy.mode = mode
    try:
        browser.step("open", url=app_url)
        out = browser.step("run", prompt=PROMPT, maxTokens=N, mode="cloud")["seen"]
    finally:
        cloud_proxy.mode = "pass"
    assert out["side"] == "device" and out["cloudError"] == reason, out
    assert "cloud failed" in out["reason"] and "answered on the device" in out["badge"]
    if mode == "500":
        assert "failed (HTTP 500)" in out["reason"]
    assert out["ids"] == runtimes["llamacpp"].greedy(rt_model["prompt_ids"], N)


def test_stopped_cloud_falls_back_on_the_device(browser, app_dir, cloud):
    proxy = FaultProxy(cloud.port)
    with AppServer(app_dir, "--cloud", proxy.url) as srv:
        url = srv.url
        browser.step("open", url=url)
        assert browser.step("run", prompt=PROMPT, maxTokens=4, mode="cloud")["seen"]["side"] == "cloud"
        proxy.stop()  # the cloud is gone
        out = browser.step("run", prompt=PROMPT, maxTokens=4, mode="cloud")["seen"]
    assert out["side"] == "device" and out["cloudError"] == "http_502", out
    assert "did not answer" in out["reason"]


@pytest.mark.parametrize("prompt, private", [("send it to bob@example.com\ndef f(", False), (PROMPT, True)])
def test_private_queries_make_no_cloud_request(browser, app_url, cloud_proxy, prompt, private):
    browser.step("open", url=app_url)
    before = cloud_proxy.count
    for mode in ("cloud", "auto"):
        out = browser.step("run", prompt=prompt, maxTokens=4, mode=mode, private=private)
        assert out["seen"]["side"] == "device" and out["seen"]["reason"].startswith("private ("), out
        assert out["v1_requests"] == 0
    assert cloud_proxy.count == before


def test_reload_offline_still_answers(browser, app_url, runtimes, rt_model):
    browser.step("open", url=app_url)
    assert browser.step("wait-sw")["seen"] is True
    browser.step("offline", value=True)
    try:
        seen = browser.step("reload")["seen"]
        assert seen["loaded"] and not seen["error"], seen
        out = browser.step("run", prompt=PROMPT, maxTokens=N, mode="auto")["seen"]
    finally:
        browser.step("offline", value=False)
    assert out["ids"][:8] == runtimes["llamacpp"].greedy(rt_model["prompt_ids"], 8)
    assert out["side"] == "device"  # offline: the cloud fails or the router kept it here


def test_bad_input_gets_a_message(browser, app_url):
    browser.step("open", url=app_url)
    out = browser.step("run", prompt="   ", maxTokens=4, mode="device")["seen"]
    assert out["error"] == "type a prompt first" and out["ids"] == []
    long = browser.step("run", prompt="x " * 3000, maxTokens=4, mode="device")["seen"]
    assert "context" in long["error"], long
    ok = browser.step("run", prompt=PROMPT, maxTokens=2, mode="device")["seen"]  # still usable
    assert len(ok["ids"]) == 2 and not ok["error"]


def test_corrupt_model_is_refused_in_the_page(browser, app_dir, tmp_path):
    copy = tmp_path / "app"
    shutil.copytree(app_dir, copy)
    with AppServer(copy) as srv:
        url = srv.url
        model = next((copy / "models").glob("*/model.gguf"))
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF  # after the server checked the folder: only the page can notice
        model.write_bytes(bytes(data))
        seen = browser.step("open", url=url)["seen"]
    assert not seen["loaded"] and "sha256 does not match" in seen["error"], seen


def test_model_over_the_storage_quota_is_refused_plainly(browser, app_dir):
    with AppServer(app_dir) as srv:
        url = srv.url
        browser.step("quota", origin=url.rstrip("/"), bytes=1_000_000)
        seen = browser.step("open", url=url)["seen"]
    assert not seen["loaded"] and "free some storage or pick a smaller model" in seen["error"], seen


def test_onnx_answer_is_pythons_greedy_and_scores_alike(browser, app_url, app_dir, runtimes, rt_model):
    """The ONNX artifact in onnxruntime-web, its tokenizer in the page: the same greedy ids and text as edgelm's
    ONNX Runtime backend, and the same router score as the Python router on it."""
    from edgelm.coop.routers import RouterState, router_from_state

    seen = browser.step("open", url=app_url + "?model=onnx")["seen"]
    assert seen["loaded"] and "onnx" in seen["info"] and not seen["error"], seen
    page = browser.step("run", prompt=PROMPT, maxTokens=N, mode="device")["seen"]
    py = runtimes["onnx"].greedy(rt_model["prompt_ids"], N)
    assert page["ids"] == py, json.dumps(page)
    assert page["text"] == runtimes["onnx"].decode(py) and EMOJI in page["text"] and LONG in page["text"]
    auto = browser.step("run", prompt=PROMPT, maxTokens=N, mode="auto")["seen"]
    route = json.loads((app_dir / "app.json").read_text())["models"][1]["route"]
    router = router_from_state(RouterState(route["router"], route["threshold"], params=route["params"]))
    assert auto["score"] == pytest.approx(router.score(runtimes["onnx"], rt_model["prompt_ids"]).score, abs=1e-4)


def test_mixed_onnx_with_a_shared_4bit_embedding_runs_in_the_page(browser, rt_model, tiny_corpus, tmp_path_factory):
    """A mixed plan at its smallest (every matrix Q4_0) exported to ONNX shares one GPTQ 4-bit matrix between the
    embedding (GatherBlockQuantized) and the lm_head: onnxruntime-web runs it and answers with edgelm's ONNX
    Runtime backend's greedy picks.

    Its MatMulNBits round activations to int8 (accuracy_level 4), and native ONNX Runtime and its WebAssembly build
    round and sum in different orders, so on this random 4-bit model a near-tie can go either way (seen on an AMD
    EPYC: top-2 logits 0.035 apart at step 8). So each of the page's ids is checked against native ONNX Runtime's
    logits for the page's own prefix: its argmax, or within 0.1 of it, and at most 2 of the 16 not the argmax."""
    from edgelm.app.build import build_app
    from edgelm.artifact.api import export
    from edgelm.quant.api import quantize
    from edgelm.runtimes.api import load
    from tests.runtime_fixtures import CHECK

    root, data = tmp_path_factory.mktemp("mixed-app"), (str(tiny_corpus),)
    quantize(model=str(rt_model["folder"]), quant="gptq-mixed", budget_bpw=4.5, out=root / "q", data=data,
             calib_samples=8, calib_seqlen=64, eval_seqs=0)
    m = export(model=root / "q", target="onnx", quant="gptq-mixed", budget_bpw=4.5, out=root / "mixed", data=data,
               **CHECK).manifest
    assert m["shared_embeddings"] and m["ops"]["GatherBlockQuantized"] == 1
    build_app(artifacts=(str(root / "mixed"),), out=str(root / "app"), data=data, calib_queries=8)
    with AppServer(root / "app") as srv:
        seen = browser.step("open", url=srv.url + "?model=mixed")["seen"]
        assert seen["loaded"] and not seen["error"], seen
        page = browser.step("run", prompt=PROMPT, maxTokens=N, mode="device")["seen"]
    rt = load(root / "mixed", runtime="onnx", threads=1)
    try:
        prompt = rt_model["prompt_ids"]
        logits = rt.logits(prompt + page["ids"][:-1])[len(prompt) - 1:]  # [N, V]: each step's, after the page's ids
    finally:
        rt.close()
    assert len(page["ids"]) == N, json.dumps(page)
    picked = logits[np.arange(N), page["ids"]]  # [N]
    gap = logits.max(-1) - picked  # [N], 0 where the page took native's argmax
    assert gap.max() <= 0.1 and (gap > 0).sum() <= 2, (gap.round(4).tolist(), json.dumps(page))


def test_page_tokenizer_is_pythons(browser_ready, rt_model, artifacts, tiny_corpus):
    """tokenizer.json in the page's tokenizer (@huggingface/tokenizers) gives Python's ids: the corpus's test split,
    emoji, the 41-byte token, special tokens."""
    from edgelm.data.corpus import Corpus, CorpusSpec
    from edgelm.runtimes.text import TextTokenizer

    texts = [text[:3000] for _, text in Corpus(CorpusSpec((str(tiny_corpus),))).documents("test")]
    texts += [f"emoji {EMOJI}👍🏽 中文  tabs\t\n", LONG * 3 + "x", "<|im_start|>user\nhi<|im_end|>\n", PROMPT]
    folder = artifacts["onnx"]
    script = f"""
import {{ Tokenizer }} from '{(DEMO / "www" / "vendor" / "tokenizers" / "tokenizers.min.mjs").as_posix()}';
import {{ readFileSync }} from 'node:fs';
const read = (f) => JSON.parse(readFileSync('{folder.as_posix()}/' + f, 'utf8'));
const tok = new Tokenizer(read('tokenizer.json'), read('tokenizer_config.json'));
const texts = JSON.parse(readFileSync(0, 'utf8'));
console.log(JSON.stringify(texts.map((t) => tok.encode(t, {{ add_special_tokens: false }}).ids)));
"""
    r = subprocess.run(["node", "--input-type=module", "-e", script], input=json.dumps(texts), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    py = TextTokenizer.from_folder(folder)
    want = [py.encode(t) for t in texts]
    assert len(texts) > 5 and sum(map(len, want)) > 2000
    assert json.loads(r.stdout) == want
