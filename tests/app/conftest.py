"""The app in a real browser: Debian's chromium driven by playwright-core (edgelm.app.browser), the app built from
the tiny GGUF and served by `edgelm app serve`, its /v1 proxied to a real cloud (llama-cpp-python's server) through
the fault proxy. `make test` installs chromium and the npm packages; where they are missing the browser tests skip
with the command that installs them (under CI they fail instead)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgelm.app.browser import AppServer, Browser, browser_missing
from tests.cloud_fixtures import FaultProxy
from tests.conftest import ROOT

SHOTS = ROOT / "runs" / "test-artifacts"  # screenshots the tests keep


@pytest.fixture(scope="session")
def browser_ready():
    why = browser_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {why}")
        pytest.skip(f"browser tests skipped: {why}")


@pytest.fixture(scope="module")
def browser(browser_ready):
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="session")
def app_dir(artifacts, tiny_corpus, tmp_path_factory) -> Path:
    """The app built from the tiny fp32 GGUF (the default model) and ONNX, routers calibrated on the tiny corpus."""
    from edgelm.app.build import build_app

    out = tmp_path_factory.mktemp("app") / "app"
    build_app(artifacts=(str(artifacts["llamacpp"]), str(artifacts["onnx"])), out=str(out),
              data=(str(tiny_corpus),), calib_queries=8)
    return out


@pytest.fixture(scope="session")
def cloud_proxy(cloud):
    p = FaultProxy(cloud.port)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def app_url(app_dir, cloud_proxy):
    """`edgelm app serve` on the app, /v1 proxied to the cloud through the fault proxy."""
    with AppServer(app_dir, "--cloud", cloud_proxy.url) as srv:
        yield srv.url
