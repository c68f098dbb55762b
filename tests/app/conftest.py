"""The app in a real browser: Debian's chromium driven by playwright-core (tests/app/browser.mjs), the app built from
the tiny GGUF and served by `edgelm app serve`, its /v1 proxied to a real cloud (llama-cpp-python's server) through
the fault proxy. `make test` installs chromium and the npm packages; where they are missing the browser tests skip
with the command that installs them (under CI they fail instead)."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.cloud_fixtures import FaultProxy, free_port, wait_http
from tests.conftest import ROOT

DEMO = ROOT / "android_demo"
PLAYWRIGHT = DEMO / "node_modules" / "playwright-core"
CHROMIUM = os.environ.get("EDGELM_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "runs" / "test-artifacts"  # screenshots the tests keep


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not shutil.which("node"):
        return "node is not installed"
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if not PLAYWRIGHT.is_dir() or not (DEMO / "www" / "vendor" / "wllama" / "single-thread" / "wllama.wasm").is_file():
        return "the app's npm packages are missing (make app-deps)"
    return None


@pytest.fixture(scope="session")
def browser_ready():
    why = browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {why}")
        pytest.skip(f"browser tests skipped: {why}")


class Browser:
    """One chromium (Pixel 7 emulation) driven step by step; ``step`` returns what the page showed."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["node", str(Path(__file__).with_name("browser.mjs")), str(PLAYWRIGHT), CHROMIUM],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def step(self, do: str, timeout: float = 180, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"do": do, **kw}) + "\n")
        self.proc.stdin.flush()
        try:
            out = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"the browser did not finish {do!r} in {timeout} s") from None
        if "error" in out:
            raise AssertionError(f"browser step {do!r} failed: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"do": "quit"}\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


@pytest.fixture(scope="module")
def browser(browser_ready):
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="session")
def app_dir(artifacts, tiny_corpus, tmp_path_factory) -> Path:
    """The app built from the tiny fp32 GGUF, its router calibrated on the tiny corpus."""
    from edgelm.app.build import build_app

    out = tmp_path_factory.mktemp("app") / "app"
    build_app(artifacts=(str(artifacts["llamacpp"]),), out=str(out), data=(str(tiny_corpus),), calib_queries=8)
    return out


@pytest.fixture(scope="session")
def cloud_proxy(cloud):
    p = FaultProxy(cloud.port)
    yield p
    p.stop()


def start_app_server(folder: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgelm", "app", "serve", str(folder), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    wait_http(url + "edgelm-serve.json", proc=proc)
    return proc, url


@pytest.fixture(scope="session")
def app_url(app_dir, cloud_proxy):
    """`edgelm app serve` on the app, /v1 proxied to the cloud through the fault proxy."""
    proc, url = start_app_server(app_dir, "--cloud", cloud_proxy.url)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
