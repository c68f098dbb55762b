"""`edgelm app serve`: isolation headers and MIME types, the /v1 proxy (the cloud's key added here, never sent to
the page), and its own key when reachable beyond loopback."""
from __future__ import annotations

import http.server
import json
import threading

import httpx
import pytest

from edgelm.app.browser import AppServer
from tests.cloud_fixtures import free_port
from tests.conftest import run_cli


class Recorder:
    """An OpenAI-ish endpoint on loopback that records the headers it was sent."""

    def __init__(self) -> None:
        self.headers: list[dict] = []
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rec.headers.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps({"object": "list", "data": [{"id": "recorder"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def recorder():
    r = Recorder()
    yield r
    r.stop()


def test_headers_and_types(app_dir):
    with AppServer(app_dir) as srv:
        url = srv.url
        page = httpx.get(url)
        wasm = httpx.get(url + "vendor/wllama/single-thread/wllama.wasm")
        js = httpx.get(url + "app.js")
        no_cloud = httpx.post(url + "v1/completions", json={"prompt": "x"})
        info = httpx.get(url + "edgelm-serve.json").json()
    for r in (page, wasm, js):
        assert r.status_code == 200
        assert r.headers["cross-origin-opener-policy"] == "same-origin"
        assert r.headers["cross-origin-embedder-policy"] == "require-corp"
    assert wasm.headers["content-type"] == "application/wasm"
    assert js.headers["content-type"].startswith("text/javascript")
    assert page.headers["cache-control"] == "no-cache" and "<title>edgelm on device</title>" in page.text
    assert no_cloud.status_code == 503 and "--cloud" in no_cloud.json()["error"]["message"]
    assert info == {"cloud": False, "key_required": False}


def test_proxy_adds_the_cloud_key_and_needs_its_own(app_dir, recorder):
    env = {"EDGELM_CLOUD_API_KEY": "cloud-secret", "EDGELM_SERVE_API_KEY": "app-secret"}
    with AppServer(app_dir, "--cloud", recorder.url, env=env) as srv:
        url = srv.url
        assert httpx.get(url).status_code == 200  # the app itself needs no key
        denied = httpx.get(url + "v1/models")
        wrong = httpx.get(url + "v1/models", headers={"Authorization": "Bearer nope"})
        ok = httpx.get(url + "v1/models", headers={"Authorization": "Bearer app-secret"})
        info = httpx.get(url + "edgelm-serve.json").json()
    assert denied.status_code == wrong.status_code == 401 and "settings" in denied.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "recorder"
    assert len(recorder.headers) == 1 and recorder.headers[0]["authorization"] == "Bearer cloud-secret"
    assert info == {"cloud": True, "key_required": True}


def test_unreachable_cloud_is_a_502(app_dir):
    with AppServer(app_dir, "--cloud", f"http://127.0.0.1:{free_port()}/v1") as srv:
        url = srv.url
        r = httpx.post(url + "v1/completions", json={"prompt": "x"})
    assert r.status_code == 502 and "did not answer" in r.json()["error"]["message"]


def test_beyond_loopback_needs_a_key(app_dir):
    r = run_cli("app", "serve", str(app_dir), "--host", "0.0.0.0", env={"EDGELM_SERVE_API_KEY": ""})
    assert r.returncode == 2 and "--insecure" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("app", "serve", str(app_dir), "--cloud", "127.0.0.1:8080")
    assert r.returncode == 2 and "must start with http" in r.stderr


def test_cors_only_for_the_origins_given(app_dir, recorder):
    pre = {"Origin": "http://localhost", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    with AppServer(app_dir, "--cloud", recorder.url, "--cors-origin", "http://localhost") as srv:
        ok = httpx.options(srv.url + "v1/completions", headers=pre)
        other = httpx.options(srv.url + "v1/completions", headers={**pre, "Origin": "http://evil.example"})
        get = httpx.get(srv.url + "v1/models", headers={"Origin": "http://localhost"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost"
    assert "access-control-allow-origin" not in other.headers
    assert get.status_code == 200 and get.headers["access-control-allow-origin"] == "http://localhost"
