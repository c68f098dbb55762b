"""`edgelm serve` as a user runs it: the OpenAI Python client and curl against a real server on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, run_cli
from tests.cloud_fixtures import free_port, wait_http


class Served:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "EDGELM_CLOUD_API_KEY": "sk-never-printed-0123456789abcdef",
               **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        wait_http(f"{self.url}/health", timeout=120, proc=self.proc)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture()
def served(artifacts, proxy):
    s = Served("--device", str(artifacts["llamacpp"]), "--cloud-url", proxy.url, "--router", "always-cloud",
               "--deadline", "3", "--max-queue", "2", "--threads", "1")
    yield s
    log = s.stop()
    assert "sk-never-printed" not in log


def test_openai_client_chat_and_stream(served, cloud, proxy, device):
    from openai import OpenAI

    from tests.cloud_fixtures import direct_chat

    client = OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    direct_chat(cloud.url, msgs, 12)  # the server's cache holds this prompt for both requests (see direct_chat)
    r = client.chat.completions.create(model="edgelm", messages=msgs, max_tokens=12, temperature=0)
    meta = r.model_extra["edgelm"]
    assert meta["routed_to"] == "cloud" and meta["fallback_reason"] is None and meta["cloud_latency_s"] > 0
    assert r.choices[0].message.content == direct_chat(cloud.url, msgs, 12)

    proxy.mode = "500"  # the device answers, and says why
    chunks = list(client.chat.completions.create(model="edgelm", messages=msgs, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    meta = chunks[-1].model_extra["edgelm"]
    assert meta["routed_to"] == "device" and meta["fallback_reason"] == "http_500"
    assert text == device.chat(msgs, max_new_tokens=12).text

    private = client.chat.completions.create(model="edgelm", messages=msgs, max_tokens=4,
                                             extra_body={"edgelm": {"private": True}})
    assert private.model_extra["edgelm"]["fallback_reason"] == "private"


def test_curl_completions_health_metrics(served):
    def curl(*args: str) -> tuple[int, str]:
        r = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
        body, code = r.stdout.rsplit("\n", 1)
        return int(code), body

    code, body = curl(f"{served.url}/v1/completions", "-H", "content-type: application/json",
                      "-d", json.dumps({"prompt": "import os\n", "max_tokens": 8}))
    assert code == 200
    out = json.loads(body)
    assert out["object"] == "text_completion" and out["edgelm"]["routed_to"] == "cloud" and out["choices"][0]["text"]
    code, body = curl(f"{served.url}/v1/completions", "-H", "x-edgelm-private: 1", "-H",
                      "content-type: application/json", "-d", json.dumps({"prompt": "import os\n", "max_tokens": 8}))
    assert code == 200 and json.loads(body)["edgelm"]["fallback_reason"] == "private"
    code, body = curl(f"{served.url}/health")
    assert code == 200 and json.loads(body) == {"status": "ok"}  # nothing about the setup to whoever reaches it
    code, body = curl(f"{served.url}/info")
    assert code == 200 and json.loads(body)["router"] == "always-cloud"
    code, body = curl(f"{served.url}/metrics")
    assert code == 200
    assert 'edgelm_requests_total{routed_to="cloud"} 1' in body and 'edgelm_requests_total{routed_to="device"} 1' in body
    assert "edgelm_private_total 1" in body and 'edgelm_request_seconds_bucket{le="+Inf"} 2' in body


@pytest.mark.parametrize("body, reason", [
    ("{not json", "the body is not valid JSON"),
    (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "user"}]}), "each message needs a string 'role' and a string 'content'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), "'max_tokens' must be a whole number"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": 2}), r"top_p=2.0: must be in \(0, 1\]"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), "'temperature' must be a number"),
])
def test_malformed_requests_are_400_with_the_reason(served, body, reason):
    import re

    import httpx

    r = httpx.post(f"{served.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and re.search(reason, r.json()["error"]["message"])


def test_load_concurrent_clients(artifacts):
    """N clients at once on a device-only server with a queue of 2: every answer is a 200 or a documented 503."""
    import httpx

    s = Served("--device", str(artifacts["llamacpp"]), "--router", "always-device", "--max-queue", "2",
               "--threads", "1")
    n, statuses, lat = 24, [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 16})
            code = r.status_code
            if code == 503:
                assert r.json()["error"]["type"] == "overloaded"
        except Exception as e:  # counted as an error below
            code = repr(e)
        with lock:
            statuses.append(code)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    wall = time.perf_counter() - t0
    metrics = httpx.get(f"{s.url}/metrics", timeout=10).text
    s.stop()
    lat.sort()
    print(f"load: {n} clients, {statuses.count(200)} x 200, {statuses.count(503)} x 503, "
          f"p50 {lat[len(lat) // 2] * 1e3:.0f} ms, p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3:.0f} ms, "
          f"wall {wall:.1f} s")
    assert len(statuses) == n and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2
    assert f"edgelm_busy_total {statuses.count(503)}" in metrics


def test_serve_bad_input(artifacts):
    r = run_cli("serve", "--device", str(artifacts["llamacpp"]), "--router", "confidence")
    assert r.returncode == 2 and "needs a cloud: pass --cloud-url" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", "--device", str(artifacts["llamacpp"]), "--cloud-url", "http://127.0.0.1:9/v1",
                "--cloud-budget", "1.5")
    assert r.returncode == 2 and "--cloud-budget must be a share between 0 and 1" in r.stderr
    r = run_cli("serve", "--device", str(artifacts["llamacpp"]), "--cloud-url", "http://127.0.0.1:9/v1",
                "--router", "nope")
    assert r.returncode == 2 and "unknown router 'nope'" in r.stderr
    r = run_cli("serve", "--cloud-url", "http://127.0.0.1:9/v1")
    assert r.returncode == 2 and "pass --device" in r.stderr


def test_unreachable_cloud_at_startup_warns_and_serves(artifacts, caplog, tmp_path):
    import logging

    from edgelm.coop.api import build_runtime
    from edgelm.coop.routers import RouterState

    url = f"http://127.0.0.1:{free_port()}/v1"
    with caplog.at_level(logging.WARNING):
        coop, state = build_runtime(device=str(artifacts["llamacpp"]), cloud_url=url, router="confidence",
                                    cloud_budget=0.5, calib_queries=8, router_file=str(tmp_path / "router.json"),
                                    threads=1)
    assert "does not answer: serving device-only" in caplog.text
    assert state.calibration["prompts"] == 8 and abs(state.calibration["achieved_share"] - 0.5) <= 0.15
    assert RouterState.load(tmp_path / "router.json") == state  # stored with the router
    answers = [coop.complete(f"def f{i}(x):\n", max_tokens=4) for i in range(6)]
    assert all(a.routed_to == "device" for a in answers)
    assert {a.fallback_reason for a in answers if a.score > a.threshold} <= {"unreachable", "circuit_open"}
    coop.device.close()


def test_a_server_beyond_loopback_needs_a_key(artifacts, tmp_path):
    base = ("serve", "--device", str(artifacts["llamacpp"]), "--router", "always-device", "--threads", "1")
    r = run_cli(*base, "--host", "0.0.0.0", env={"EDGELM_SERVE_API_KEY": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("--host 0.0.0.0 lets other machines reach this server and spend its cloud budget; set "
            "EDGELM_SERVE_API_KEY (or --serve-key-file) to a key clients must send, or pass --insecure") in r.stderr
    r = run_cli(*base, "--host", "0.0.0.0", "--serve-key-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot read the API key file" in r.stderr


def test_with_a_key_every_path_but_health_needs_it(artifacts):
    import httpx

    s = Served("--device", str(artifacts["llamacpp"]), "--router", "always-device", "--threads", "1",
               env={"EDGELM_SERVE_API_KEY": "inbound-secret-42"})
    try:
        body = {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
        assert httpx.get(f"{s.url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "inbound-secret-42"}):
            r = httpx.post(f"{s.url}/v1/completions", json=body, headers=headers, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        ok = httpx.post(f"{s.url}/v1/completions", json=body, headers={"Authorization": "Bearer inbound-secret-42"},
                        timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
        assert httpx.get(f"{s.url}/metrics", headers={"x-api-key": "inbound-secret-42"}).status_code == 200
        from openai import AuthenticationError, OpenAI

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{s.url}/v1", api_key="nope").completions.create(model="edgelm", prompt="x", max_tokens=2)
        r = OpenAI(base_url=f"{s.url}/v1", api_key="inbound-secret-42").completions.create(
            model="edgelm", prompt="def add(a, b):", max_tokens=4, temperature=0)
        assert r.choices[0].text == ok.json()["choices"][0]["text"]
    finally:
        log = s.stop()
    assert "inbound-secret-42" not in log


def test_inbound_key_rules(monkeypatch, caplog):
    import logging

    from edgelm.coop.api import inbound_key, is_loopback
    from edgelm.coop.config import ServeConfig
    from edgelm.errors import EdgelmError

    assert [is_loopback(h) for h in ("127.0.0.1", "127.5.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.5",
                                     "myhost")] == [True, True, True, True, False, False, False]
    monkeypatch.delenv("EDGELM_SERVE_API_KEY", raising=False)
    assert inbound_key(ServeConfig(host="::1")) is None
    with pytest.raises(EdgelmError, match="pass --insecure"):
        inbound_key(ServeConfig(host="192.168.1.5"))
    with caplog.at_level(logging.WARNING):
        assert inbound_key(ServeConfig(host="0.0.0.0", insecure=True)) is None
    assert "without an API key (--insecure)" in caplog.text
    monkeypatch.setenv("EDGELM_SERVE_API_KEY", "k1")
    assert inbound_key(ServeConfig(host="0.0.0.0")) == "k1" and inbound_key(ServeConfig()) == "k1"


def _asgi_coop(artifacts):
    from edgelm.coop.runtime import CooperativeRuntime
    from edgelm.coop.server import create_app
    from edgelm.runtimes.api import load

    coop = CooperativeRuntime(load(artifacts["llamacpp"], threads=1), None, "always-device", max_queue=1)
    return coop, create_app(coop, max_tokens_limit=256)


def test_a_client_that_stops_reading_does_not_hold_the_device(artifacts):
    """The client reads the response start and first chunk, then never reads again (its send never returns): the
    device and the queue slot are free once generation ends, not when the stalled connection goes."""
    import asyncio

    coop, app = _asgi_coop(artifacts)
    body = json.dumps({"prompt": "def add(a, b):", "max_tokens": 48, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def run() -> tuple[bool, int]:
        msgs, first = [{"type": "http.request", "body": body, "more_body": False}], asyncio.Event()

        async def receive():
            if msgs:
                return msgs.pop(0)
            await asyncio.Event().wait()  # the client never sends anything again, and never leaves

        async def send(m):
            if m["type"] == "http.response.body" and m.get("body"):
                first.set()
                await asyncio.Event().wait()  # and never reads again: this send never returns

        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(first.wait(), 60)
        free = await asyncio.to_thread(coop._device_lock.acquire, True, 60)
        if free:
            coop._device_lock.release()
        queued = coop._queued
        task.cancel()
        return free, queued

    try:
        free, queued = asyncio.run(run())
    finally:
        coop.close()
    assert free and queued == 0


def test_failures_are_openai_errors_streamed_or_not(artifacts, monkeypatch):
    """A failure of ours (not the client's) is a 500 with OpenAI's error JSON; mid-stream, an SSE error event and
    [DONE]; the device is free after either."""
    import asyncio

    import httpx

    from edgelm.runtimes.base import Stream

    coop, app = _asgi_coop(artifacts)

    def broken(ids, cfg=None, *, stream=False, **kw):
        def gen():
            yield "x"
            yield "y"
            raise RuntimeError("the device broke")

        return Stream(gen())

    monkeypatch.setattr(coop.device, "generate", broken)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            plain = await c.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 8})
            streamed = await c.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 8, "stream": True})
            over = await c.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 257})
            huge = await c.post("/v1/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
            nan = await c.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}')
            missing = await c.get("/v1/nothing")
        return plain, streamed, over, huge, nan, missing

    try:
        plain, streamed, over, huge, nan, missing = asyncio.run(run())
        assert coop._device_lock.acquire(timeout=10)
        coop._device_lock.release()
        assert coop._queued == 0
    finally:
        coop.close()
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
    assert "RuntimeError" in plain.json()["error"]["message"]
    events = [e for e in streamed.text.split("\n\n") if e]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][5:])["error"]["type"] == "server_error"
    assert [json.loads(e[5:])["choices"][0]["text"] for e in events[:2]] == ["x", "y"]
    assert over.status_code == 400 and "limit of 256" in over.json()["error"]["message"]
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "request_too_large"
    assert nan.status_code == 400 and missing.status_code == 404 and "error" in missing.json()
