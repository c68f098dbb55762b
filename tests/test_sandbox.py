"""The sandbox: a program's exit, output and limits; no network, no environment, nothing left behind."""
from __future__ import annotations

import socket
import threading

from edgelm.sandbox import network_namespace, run_python


def test_exit_status_output_and_the_failing_line():
    assert run_python("print(6 * 7)") .stdout.strip() == "42"
    r = run_python("assert 1 + 1 == 3, 'arithmetic'")
    assert not r.ok and not r.timed_out and r.detail == "AssertionError: arithmetic"


def test_a_loop_is_killed_at_the_time_limit_with_what_it_started(tmp_path):
    import time

    marker = tmp_path / "child"
    t0 = time.monotonic()
    # the prelude blocks os.fork; a child started through subprocess is in the same process group and dies too
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"
    r = run_python(f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True: pass",
                   timeout=1.0)
    assert r.timed_out and not r.ok and time.monotonic() - t0 < 10
    time.sleep(3.5)
    assert not marker.exists()


def test_memory_is_limited():
    r = run_python("x = bytearray(512 << 20)", memory_mib=256)
    assert not r.ok and "MemoryError" in r.detail


def test_no_network_and_no_environment(monkeypatch):
    """A server on 127.0.0.1 that would answer: the sandboxed program can't reach it (socket calls raise; with user
    namespaces, it has no loopback either) and sees none of this process's environment."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got: list[bytes] = []

    def serve():
        srv.settimeout(5)
        try:
            conn, _ = srv.accept()
            got.append(conn.recv(10))
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=serve)
    t.start()
    monkeypatch.setenv("EDGELM_SECRET", "x")
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')")
    assert not r.ok and "network access is disabled" in r.detail
    # the low-level module too, where the kernel gives it a namespace of its own
    r2 = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
    assert r2.ok is (not network_namespace())
    assert run_python("import os\nassert 'EDGELM_SECRET' not in os.environ").ok
    t.join()
    srv.close()
    assert got == [] or not network_namespace()  # in a namespace of its own, nothing reached the server
