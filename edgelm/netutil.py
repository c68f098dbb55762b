"""Servers edgelm starts on this machine (the local cloud, throwaway bench devices, `edgelm serve` in benchmarks): a
free loopback port, waiting for one to answer, and stopping its process."""
from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers below 500; raises when ``proc`` exits first or ``timeout`` seconds pass."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, *, kill: bool = False) -> None:
    """Stop a child: SIGTERM (SIGKILL with ``kill``), then SIGKILL if it is still there after ``timeout`` s."""
    if proc.poll() is not None:
        return
    (proc.kill if kill else proc.terminate)()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
