"""CooperativeRuntime against a real OpenAI-compatible server on loopback, with faults injected by a proxy."""
from __future__ import annotations

import time

import pytest

from edgelm.cloud import CloudClient, CloudConfig
from edgelm.coop.runtime import Busy, CooperativeRuntime
from edgelm.errors import EdgelmError
from edgelm.registry import ROUTERS
from tests.cloud_fixtures import direct_chat, free_port

MSGS = [{"role": "user", "content": "def add(a, b):"}]


def coop_for(device, url: str | None, router: str = "always-cloud", deadline: float = 5.0,
             total_deadline: float | None = None, **cloud_kw):
    cloud = CloudClient(CloudConfig(url=url, retries=1, backoff=0.05, **cloud_kw)) if url else None
    return CooperativeRuntime(device, cloud, router, deadline=deadline, total_deadline=total_deadline)


def _trained(name: str):
    """A router of each registered kind, ready to score: trained ones get parameters fitted on random features."""
    cls = ROUTERS.get(name)
    try:
        return cls.from_state({})
    except EdgelmError as e:
        assert "not trained" in str(e)  # a router that needs training says so, in one line
    import numpy as np

    from edgelm.coop.learn import FEATURES, PROJ_DIM, LearnedRouter, fit_ridge

    rng = np.random.default_rng(0)
    assert cls is LearnedRouter, f"router {name!r} needs training: teach this test how to train it"
    return LearnedRouter(fit_ridge(rng.standard_normal((32, len(FEATURES) + PROJ_DIM)), rng.standard_normal(32)))


@pytest.mark.parametrize("name", ROUTERS.names())
def test_every_registered_router_scores_and_round_trips(name, device):
    """Driven by the registry: every router scores a prompt on the device (the same score twice), and rebuilt from
    its stored state it scores the same."""
    import math

    from edgelm.coop.routers import RouterState, router_from_state

    router = _trained(name)
    ids = device.encode("def add(a, b):\n    ")
    d = router.score(device, ids)
    assert isinstance(d.score, float) and not math.isnan(d.score)
    assert router.score(device, ids).score == d.score
    again = router_from_state(RouterState(router.name, 0.0, params=router.state()))
    assert type(again) is type(router) and again.score(device, ids).score == d.score


def test_cloud_answer_is_the_servers_answer(device, cloud, proxy):
    direct_chat(cloud.url, MSGS, 12)  # the server's cache holds this prompt for both requests (see direct_chat)
    coop = coop_for(device, proxy.url)
    ans = coop.chat(MSGS, max_tokens=12)
    assert ans.routed_to == "cloud" and ans.fallback_reason is None and ans.cloud_latency_s > 0
    assert ans.text == direct_chat(cloud.url, MSGS, 12) and ans.text
    assert proxy.count == 1


def test_device_answer_is_the_devices_greedy(device, proxy):
    coop = coop_for(device, proxy.url, router="always-device")
    ans = coop.chat(MSGS, max_tokens=12)
    assert ans.routed_to == "device" and ans.fallback_reason is None and ans.score is None
    assert ans.text == device.chat(MSGS, max_new_tokens=12).text
    assert proxy.count == 0


@pytest.mark.parametrize("mode, reason", [("500", "http_500"), ("malformed", "malformed_json"), ("slow", "deadline"),
                                          ("refused", "unreachable")])
@pytest.mark.parametrize("stream", [False, True])
def test_cloud_faults_end_in_a_device_answer(mode, reason, stream, device, proxy):
    url = f"http://127.0.0.1:{free_port()}/v1" if mode == "refused" else proxy.url
    proxy.mode = mode
    deadline = 1.5
    coop = coop_for(device, url, deadline=deadline)
    t0 = time.monotonic()
    if stream:
        s = coop.chat(MSGS, max_tokens=12, stream=True)
        text = "".join(s)
        ans = s.answer
    else:
        ans = coop.chat(MSGS, max_tokens=12)
        text = ans.text
    elapsed = time.monotonic() - t0
    assert ans.routed_to == "device" and ans.fallback_reason == reason
    assert text == device.chat(MSGS, max_new_tokens=12).text  # the whole answer, nothing lost
    # no hang past the deadline (bounds generous for a loaded 2-core machine; the behaviour is the device answer)
    assert ans.cloud_latency_s <= deadline + 5 and elapsed < deadline + 10
    if mode == "500":
        assert proxy.count == 2  # one retry (retries=1), then the device


def test_a_stream_cut_midway_is_continued_by_the_device(device, cloud, proxy):
    proxy.mode = "cut"
    coop = coop_for(device, proxy.url)
    s = coop.chat(MSGS, max_tokens=16, stream=True)
    text = "".join(s)
    ans = s.answer
    assert ans.routed_to == "device" and ans.fallback_reason == "stream_cut"
    partial = text[: ans.cloud_chars]
    assert partial and len(text) > len(partial)  # the client keeps what the cloud sent; the device adds the rest
    prompt = device.apply_chat_template(MSGS) + partial
    rest = device.generate(prompt, max_new_tokens=16 - len(device.encode(partial))).text
    assert text == partial + rest and ans.completion_tokens > 0


def test_a_long_answer_that_started_in_time_is_not_cut_at_the_first_token_deadline(device, cloud, proxy):
    """The first-token deadline bounds the wait for the cloud's first token, not the whole answer: a slow stream
    that starts at once runs past it and is the cloud's answer. The total deadline cuts it, and the device goes on."""
    want = direct_chat(cloud.url, MSGS, 12)
    proxy.mode, proxy.drip = "drip", 0.25  # 12 tokens take about 3 s, against a first-token deadline of 1 s
    t0 = time.monotonic()
    ans = coop_for(device, proxy.url, deadline=1.0).chat(MSGS, max_tokens=12)
    assert time.monotonic() - t0 > 1.0  # it did run past the first-token deadline
    assert ans.routed_to == "cloud" and ans.fallback_reason is None and ans.text == want
    s = coop_for(device, proxy.url, deadline=1.0, total_deadline=1.6).chat(MSGS, max_tokens=12, stream=True)
    text = "".join(s)
    ans = s.answer
    assert ans.routed_to == "device" and ans.fallback_reason == "total_deadline"
    partial = text[: ans.cloud_chars]
    assert partial and want.startswith(partial) and len(partial) < len(want)
    with pytest.raises(EdgelmError, match="must be at least its first-token deadline"):
        coop_for(device, proxy.url, deadline=5.0, total_deadline=2.0)


def test_circuit_breaker_stops_calling_a_failing_cloud(device, proxy):
    proxy.mode = "500"
    coop = coop_for(device, proxy.url, breaker_failures=2, breaker_reset=60)
    reasons = [coop.chat(MSGS, max_tokens=4).fallback_reason for _ in range(4)]
    assert reasons == ["http_500", "http_500", "circuit_open", "circuit_open"]
    assert proxy.count == 4  # 2 requests x (1 + 1 retry), none while open
    assert 'edgelm_fallbacks_total{reason="circuit_open"} 2' in coop.metrics.prometheus()


@pytest.mark.parametrize("msgs, private, flag", [
    (MSGS, True, "marked"),
    ([{"role": "user", "content": "mail jane.doe@example.com the results"}], False, "email"),
    ([{"role": "user", "content": "use key sk-proj-abcdefghijklmnop1234567890 for it"}], False, "api_key"),
    ([{"role": "user", "content": "card 4111 1111 1111 1111 exp 12/29"}], False, "card"),
    ([{"role": "user", "content": "call me at +1 415-555-0134"}], False, "phone"),
])
def test_private_requests_never_reach_the_cloud(msgs, private, flag, device, cloud, proxy):
    before = cloud.requests()
    coop = coop_for(device, proxy.url)
    for stream in (False, True):
        out = coop.chat(msgs, max_tokens=4, private=private, stream=stream)
        ans = out if not stream else (list(out), out.answer)[1]
        assert ans.routed_to == "device" and ans.fallback_reason == "private" and flag in ans.private
    assert proxy.count == 0 and cloud.requests() == before  # counted on the server side too


def test_privacy_detectors_leave_plain_code_alone():
    from edgelm.coop.privacy import PrivacyGuard

    g = PrivacyGuard()
    assert g.flags("def f(x):\n    return x * 1000 + 12345678\n") == []
    assert g.flags("version 3.11.7, port 8000, 2026-11-22") == []
    assert g.flags("4111 1111 1111 1112") == []  # fails the Luhn check


def test_device_queue_is_bounded(device, proxy):
    import threading

    coop = CooperativeRuntime(device, None, "always-device", max_queue=1)
    started = threading.Event()
    release = threading.Event()
    orig = device.generate

    def slow_generate(*a, **k):
        started.set()
        release.wait(10)
        return orig(*a, **k)

    device.generate = slow_generate
    try:
        t = threading.Thread(target=lambda: coop.chat(MSGS, max_tokens=2))
        t.start()
        started.wait(10)
        with pytest.raises(Busy, match="the device queue is full"):
            coop.chat(MSGS, max_tokens=2)
        release.set()
        t.join(10)
    finally:
        del device.generate
    assert coop.chat(MSGS, max_tokens=2).routed_to == "device"
    assert "edgelm_busy_total 1" in coop.metrics.prometheus()


def test_calibration_hits_the_budget(device):
    from edgelm.coop.data import function_queries
    from edgelm.coop.routers import calibrate

    queries = function_queries(n=20)
    ids = [device.encode(q.prompt) for q in queries]
    for name in ("confidence", "confidence-draft", "confidence-topn", "random"):
        router = ROUTERS.get(name)()
        state = calibrate(router, device, ids, 0.3)
        share = sum(router.score(device, i).score > state.threshold for i in ids) / len(ids)
        assert abs(share - 0.3) <= 0.1, (name, share)


def test_top_n_draft_is_the_head_of_the_full_distribution(device):
    """The quantities the app's router reads (wllama's top-n log-probs) come out of the same draft: the chosen
    token's log-prob first, then the next largest; their entropy share is at most the full entropy."""
    from edgelm.metrics import top_entropy

    ids = device.encode("def add(a, b):\n    ")
    d = device.draft(ids, 4, top_n=5)
    full = device.draft(ids, 4)
    assert d.ids == full.ids and len(d.top_logprobs) == len(d.ids)
    for step, lp in zip(d.top_logprobs, d.logprob):
        assert len(step) == 5 and step == sorted(step, reverse=True) and step[0] == lp
    assert 0 < top_entropy(d.top_logprobs) <= full.mean_entropy + 1e-9
    with pytest.raises(EdgelmError, match="k >= 1"):
        ROUTERS.get("confidence-topn").from_state({"k": 0, "n": 5})


def test_draft_router_reuses_its_draft(device, proxy):
    router = ROUTERS.get("confidence-draft")()
    coop = CooperativeRuntime(device, CloudClient(CloudConfig(url=proxy.url)), router, threshold=1e9)
    ans = coop.chat(MSGS, max_tokens=12)
    assert ans.routed_to == "device" and ans.score is not None and ans.router_latency_s > 0
    assert ans.text == device.chat(MSGS, max_new_tokens=12).text  # draft + continuation = plain greedy
    assert proxy.count == 0


def test_bad_construction(device):
    with pytest.raises(EdgelmError, match="needs a threshold"):
        CooperativeRuntime(device, None, "confidence")
    with pytest.raises(EdgelmError, match="must start with http"):
        CloudClient(CloudConfig(url="127.0.0.1:8001"))
    with pytest.raises(EdgelmError, match="unknown router 'nope'; known: always-cloud"):
        CooperativeRuntime(device, None, "nope")


def test_api_key_comes_from_a_file_and_never_shows(device, proxy, tmp_path, caplog):
    import logging

    key = "sk-test-SECRET0123456789abcdef"
    (tmp_path / "key").write_text(key + "\n")
    proxy.mode = "500"
    coop = coop_for(device, proxy.url, api_key_file=str(tmp_path / "key"))
    with caplog.at_level(logging.DEBUG):
        ans = coop.chat(MSGS, max_tokens=4)
    assert coop.cloud._http.headers["authorization"] == f"Bearer {key}"
    assert key not in caplog.text and key not in str(ans.metadata()) and key not in coop.metrics.prometheus()


def test_metrics_are_valid_prometheus_text_with_help_and_escaped_labels():
    """Every metric has HELP and TYPE, and a label value with quotes, backslashes and newlines is escaped."""
    from prometheus_client.parser import text_string_to_metric_families

    from edgelm.coop.runtime import Answer, Metrics

    m = Metrics()
    odd = 'cut "mid\\way"\nagain'
    m.observe(Answer("x", "device", "confidence", score=2.0, threshold=1.0, fallback_reason=odd,
                     device_latency_s=0.02), 0.03)
    m.observe(Answer("y", "cloud", "confidence", score=3.0, threshold=1.0, cloud_latency_s=0.2), 0.25)
    text = m.prometheus()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("edgelm_requests", "edgelm_cloud_share", "edgelm_fallbacks", "edgelm_busy", "edgelm_private",
                 "edgelm_request_seconds", "edgelm_device_seconds", "edgelm_cloud_seconds"):
        assert name in families and families[name].documentation, name
        assert f"# TYPE {name}" in text
    fallbacks = {s.labels["reason"]: s.value for s in families["edgelm_fallbacks"].samples if s.name.endswith("_total")}
    assert fallbacks == {odd: 1.0}
    assert [s.value for s in families["edgelm_cloud_share"].samples] == [1.0]  # both were over the threshold
    requests = {s.labels["routed_to"]: s.value for s in families["edgelm_requests"].samples if s.name.endswith("_total")}
    assert requests == {"device": 1.0, "cloud": 1.0}
