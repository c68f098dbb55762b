"""`edgelm app serve`: isolation headers and MIME types, the /v1 proxy (the cloud's key added here, never sent to
the page), and its own key when reachable beyond loopback."""
from __future__ import annotations

import gzip
import http.client
import http.server
import json
import os
import ssl
import subprocess
import threading

import httpx
import pytest

from edgelm.app.browser import AppServer
from tests.cloud_fixtures import free_port
from tests.conftest import run_cli


class Recorder:
    """An OpenAI-ish endpoint on loopback that records every request (method, path, headers, body) it was sent.
    ``gzip``: answer gzip-compressed, as most hosted APIs do (llama-cpp-python's server never does)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.gzip = False
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                rec.requests.append({"method": self.command, "path": self.path, "body": body,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.path.endswith("/models"):
                    out, typ = json.dumps({"object": "list", "data": [{"id": "recorder"}]}).encode(), "application/json"
                else:
                    chunk = {"choices": [{"index": 0, "delta": {"content": "hello"}, "text": "hello"}]}
                    out = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                    typ = "text/event-stream"
                self.send_response(200)
                self.send_header("content-type", typ)
                self.send_header("set-cookie", "session=upstream-secret")
                if rec.gzip:
                    out = gzip.compress(out)
                    self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def headers(self) -> list[dict]:
        return [r["headers"] for r in self.requests]

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


def _raw(url: str, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    """One request with the target sent as written (httpx and browsers would normalise '..' away)."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request(method, target, body=body, headers=headers or {})
    r = c.getresponse()
    out = (r.status, r.read())
    c.close()
    return out


def test_proxy_forwards_only_the_openai_paths_and_methods(app_dir, recorder):
    with AppServer(app_dir, "--cloud", recorder.url, env={"EDGELM_CLOUD_API_KEY": "cloud-secret"}) as srv:
        refused = {t: _raw(srv.url, m, t)[0] for m, t in [
            ("GET", "/v1/..%2F..%2Fadmin"), ("GET", "/v1/models%2F..%2F..%2Fadmin"), ("GET", "/v1/../admin"),
            ("POST", "/v1/chat/completions/../../admin"), ("GET", "/v1/admin"), ("GET", "/v1/files"),
            ("POST", "/v1/embeddings"), ("GET", "/v1/%2e%2e/%2e%2e/admin"), ("POST", "/v1/Models")]}
        methods = {m: _raw(srv.url, m, "/v1/chat/completions", b"{}")[0] for m in ("GET", "PUT", "DELETE", "PATCH")}
        models = _raw(srv.url, "DELETE", "/v1/models")[0]
        ok = httpx.get(srv.url + "v1/models?evil=1")
    assert set(refused.values()) == {404}, refused
    assert methods == {"GET": 405, "PUT": 405, "DELETE": 405, "PATCH": 405} and models == 405
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "recorder"
    assert [(r["method"], r["path"]) for r in recorder.requests] == [("GET", "/v1/models")]  # nothing else, no query


def test_proxy_forwards_only_the_headers_the_cloud_needs(app_dir, recorder):
    sent = {"Cookie": "sid=user-secret", "Origin": "http://127.0.0.1", "Referer": "http://127.0.0.1/secret-page",
            "Accept-Encoding": "identity-from-the-page", "X-Forwarded-For": "10.0.0.1", "X-Custom": "1",
            "Authorization": "Bearer page-key", "Content-Type": "application/json", "Accept": "text/event-stream"}
    with AppServer(app_dir, "--cloud", recorder.url, env={"EDGELM_CLOUD_API_KEY": "cloud-secret"}) as srv:
        r = httpx.post(srv.url + "v1/chat/completions", headers=sent,
                       json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8})
    assert r.status_code == 200 and "set-cookie" not in r.headers
    got = recorder.requests[0]["headers"]
    assert got["authorization"] == "Bearer cloud-secret" and got["content-type"] == "application/json"
    assert got["accept"] == "text/event-stream"
    for h in ("cookie", "origin", "referer", "x-forwarded-for", "x-custom"):
        assert h not in got, h
    assert got.get("accept-encoding") != "identity-from-the-page"


def test_gzipped_cloud_answers_reach_the_page_decoded(app_dir, recorder):
    recorder.gzip = True
    with AppServer(app_dir, "--cloud", recorder.url) as srv:
        models = httpx.get(srv.url + "v1/models")
        stream = httpx.post(srv.url + "v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8})
    assert recorder.requests and all("gzip" in r["headers"].get("accept-encoding", "") for r in recorder.requests)
    for r in (models, stream):
        assert r.status_code == 200 and "content-encoding" not in r.headers
    assert models.json()["data"][0]["id"] == "recorder"
    assert stream.content.startswith(b"data: ") and b"[DONE]" in stream.content


def test_proxy_bounds_bodies_and_max_tokens(app_dir, recorder):
    msgs = [{"role": "user", "content": "hi"}]
    with AppServer(app_dir, "--cloud", recorder.url, "--max-body-bytes", "4096", "--max-tokens-limit", "64") as srv:
        big = httpx.post(srv.url + "v1/completions", json={"prompt": "x" * 5000})

        def chunked():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        big_chunked = httpx.post(srv.url + "v1/completions", content=chunked(),
                                 headers={"content-type": "application/json"})
        over = httpx.post(srv.url + "v1/chat/completions", json={"messages": msgs, "max_tokens": 65})
        over2 = httpx.post(srv.url + "v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 10**9})
        bad = [httpx.post(srv.url + "v1/chat/completions", json={"messages": msgs, "max_tokens": v}).status_code
               for v in (0, -1, "8", True, 1.5)]
        not_object = httpx.post(srv.url + "v1/completions", json=["x"])
        absent = httpx.post(srv.url + "v1/chat/completions", json={"messages": msgs})
        given = httpx.post(srv.url + "v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 9})
    assert big.status_code == big_chunked.status_code == 413
    assert big.json()["error"]["type"] == "request_too_large" and "4096 bytes" in big.json()["error"]["message"]
    assert over.status_code == over2.status_code == 400 and "limit of 64" in over.json()["error"]["message"]
    assert bad == [400] * 5 and not_object.status_code == 400
    assert absent.status_code == given.status_code == 200
    sent = [json.loads(r["body"]) for r in recorder.requests]
    assert [b["max_tokens"] for b in sent] == [64, 9] and "max_completion_tokens" not in sent[1]


def test_tls_with_a_self_signed_certificate(app_dir, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with AppServer(app_dir, "--tls-cert", str(cert), "--tls-key", str(key)) as srv:
        assert srv.url.startswith("https://")
        r = httpx.get(srv.url + "edgelm-serve.json", verify=ssl.create_default_context(cafile=str(cert)))
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by a verifying client
            httpx.get(srv.url + "edgelm-serve.json")
    assert r.status_code == 200 and r.json()["cloud"] is False
    r = run_cli("app", "serve", str(app_dir), "--tls-cert", str(cert))
    assert r.returncode == 2 and "pass both --tls-cert and --tls-key" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("app", "serve", str(app_dir), "--tls-cert", str(key), "--tls-key", str(cert))
    assert r.returncode == 2 and "could not be loaded" in r.stderr


def test_plain_http_beyond_loopback_warns(caplog):
    import logging

    from edgelm.coop.httpsafe import tls_options

    with caplog.at_level(logging.WARNING):
        assert tls_options("127.0.0.1", "", "") == {}
        assert "in clear" not in caplog.text
        assert tls_options("0.0.0.0", "", "") == {}
    assert "travel in clear" in caplog.text


FUZZ_EXAMPLES = int(os.environ.get("EDGELM_FUZZ_EXAMPLES", "15"))  # per operation and phase; docs/results.md ran more


def fuzz(url: str, max_examples: int, tmp_path) -> tuple[int, str]:
    """schemathesis from the server's own OpenAPI schema, checking that nothing answers 5xx: (cases, output)."""
    import re
    import sys
    from pathlib import Path

    st = Path(sys.executable).parent / "st"
    r = subprocess.run([str(st), "run", url.rstrip("/") + "/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", str(max_examples), "--request-timeout", "60", "-w", "1",
                        "--wait-for-schema", "60", "--seed", "1", "--no-color"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    m = re.search(r"(\d+) generated", r.stdout)
    assert r.returncode == 0 and m, r.stdout[-3000:]
    return int(m.group(1)), r.stdout


def test_fuzz_app_serve_from_its_schema(app_dir, recorder, tmp_path):
    """Both servers are fuzzed from their OpenAPI schemas: no input answers 5xx, and nothing is a traceback in the
    log. The proxy's upstream here always answers, so what is tested is the proxy's own handling (llama-cpp-python's
    server answers 500 to some valid bodies, e.g. empty roles; the proxy turns those into a 502 error JSON)."""
    with AppServer(app_dir, "--cloud", recorder.url, "--max-tokens-limit", "4") as srv:
        cases, out = fuzz(srv.url, FUZZ_EXAMPLES, tmp_path)
        srv.proc.terminate()
        _, err = srv.proc.communicate(timeout=30)
    print(f"fuzz app serve: {cases} cases, {len(recorder.requests)} forwarded")
    assert cases >= 30 and "Traceback" not in err and recorder.requests
    for r in recorder.requests:  # what reached the cloud was valid and bounded
        if r["method"] == "POST":
            body = json.loads(r["body"])
            assert 1 <= body["max_tokens"] <= 4 and ("messages" in body or "prompt" in body)


def test_fuzz_edgelm_serve_from_its_schema(artifacts, tmp_path):
    from tests.coop.test_server import Served

    s = Served("--device", str(artifacts["llamacpp"]), "--router", "always-device", "--threads", "1",
               "--max-tokens-limit", "4")
    try:
        cases, out = fuzz(s.url, FUZZ_EXAMPLES, tmp_path)
    finally:
        log = s.stop()
    print(f"fuzz edgelm serve: {cases} cases")
    assert cases >= 30 and "Traceback" not in log
