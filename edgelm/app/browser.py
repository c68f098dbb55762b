"""The app in a real headless browser, for the tests and `benchmarks/app.py`: Debian's chromium driven by
playwright-core (android_demo/scripts/browser.mjs), emulating a Pixel 7, every request not aimed at 127.0.0.1
aborted. Never downloads a browser."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from edgelm.app.build import default_web

DEMO = default_web().parent  # android_demo/
DRIVER = DEMO / "scripts" / "browser.mjs"
PLAYWRIGHT = DEMO / "node_modules" / "playwright-core"
CHROMIUM = os.environ.get("EDGELM_CHROMIUM", "/usr/bin/chromium")


def browser_missing() -> str | None:
    """Why the app cannot be driven in a browser here, or None."""
    if not shutil.which("node"):
        return "node is not installed"
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium, or set $EDGELM_CHROMIUM)"
    if not PLAYWRIGHT.is_dir() or not (DEMO / "www" / "vendor" / "wllama" / "index.js").is_file():
        return "the app's npm packages are missing (make app-deps)"
    return None


class Browser:
    """One chromium, driven step by step; ``step`` returns what the page showed (see browser.mjs for the steps)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["node", str(DRIVER), str(PLAYWRIGHT), CHROMIUM], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def step(self, do: str, timeout: float = 180, **kw: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"do": do, **kw}) + "\n")
        self.proc.stdin.flush()
        try:
            out = json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise TimeoutError(f"the browser did not finish {do!r} in {timeout} s") from None
        if "error" in out:
            raise RuntimeError(f"browser step {do!r} failed: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"do": "quit"}\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AppServer:
    """`edgelm app serve FOLDER ARGS...` in a child process on a free loopback port, until ``stop``."""

    def __init__(self, folder: str | Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> None:
        import sys
        import time
        import urllib.request

        from edgelm.coop.localcloud import free_port

        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelm", "app", "serve", str(folder), "--port",
                                      str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        tls = "--tls-cert" in args
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
        ctx = None
        if tls:  # a test's self-signed certificate: the caller checks it, this only waits for the port
            import ssl

            ctx = ssl._create_unverified_context()
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgelm app serve exited: {self.proc.stderr.read()[-500:]}")
            try:
                urllib.request.urlopen(self.url + "edgelm-serve.json", timeout=1, context=ctx).close()
                return
            except OSError:
                if time.monotonic() > end:
                    self.stop()
                    raise TimeoutError(f"edgelm app serve did not answer in {timeout} s") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> "AppServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def bench_in_browser(browser: Browser, throttle: float = 1.0, **config: Any):
    """`edgelm bench --device browser` with ``browser`` as the device: bench(**config) runs in a thread while the
    browser, under DevTools CPU throttling ``throttle`` (1: none; 4: a phone four times slower), opens the bench page
    and runs it to the end. Returns bench's result; its errors are raised here."""
    import socket
    import time

    from edgelm.bench.api import bench
    from edgelm.coop.localcloud import free_port

    port = free_port()
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            got["res"] = bench(device=f"browser:{port}", **config)
        except Exception as e:  # noqa: BLE001 - handed to the caller's thread
            got["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    end = time.monotonic() + 300  # the app build (sha256 of every artifact) comes before the server
    while t.is_alive():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError("the bench page was not served within 300 s") from None
            time.sleep(0.2)
    if t.is_alive():
        browser.step("throttle", rate=throttle)
        try:
            seen = browser.step("bench", url=f"http://127.0.0.1:{port}/bench.html", timeout=3600)["seen"]
        finally:
            browser.step("throttle", rate=1)
        if seen.get("error"):
            got.setdefault("page", seen["error"])
    t.join(timeout=600)
    if "err" in got:
        raise got["err"]
    return got["res"]
