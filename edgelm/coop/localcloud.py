"""A cloud on this machine: llama-cpp-python's OpenAI-compatible server on 127.0.0.1, for the demo, the routing
benchmark and the tests. It logs every request it serves, which the privacy tests count. FaultProxy, in front of
it, injects the cloud's failures for the tests and the soak benchmark."""
from __future__ import annotations

import http.client
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgelm.errors import EdgelmError
from edgelm.netutil import free_port, stop_process, wait_http  # noqa: F401  (free_port: imported from here too)


class LocalCloud:
    """``with LocalCloud(gguf, log) as cloud: cloud.url``; stops the server on exit."""

    def __init__(self, gguf: str | Path, log: str | Path, *, port: int | None = None, n_ctx: int = 1024,
                 threads: int = 1, timeout: float = 120.0) -> None:
        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = Path(log)
        self._log_file = open(self.log, "w")  # the server's output; closed by stop()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
                 str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
                 # a cloud serves each client to the end: by default this server cuts a stream short when another
                 # request arrives, which a real cloud never does to its clients
                 "--interrupt_requests", "False"],
                stdout=self._log_file, stderr=subprocess.STDOUT)
        except BaseException:
            self._log_file.close()
            raise
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.stop()
                raise EdgelmError(f"the local cloud server exited ({self.proc.returncode}); see {self.log} "
                                  "(it needs pip install 'edgelm[llamacpp]')")
            try:
                if httpx.get(f"{self.url}/models", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise EdgelmError(f"the local cloud server did not answer in {timeout:.0f} s; see {self.log}")

    def requests(self) -> int:
        """Completion requests the server has logged."""
        text = self.log.read_text(errors="replace")
        return text.count('"POST /v1/chat/completions') + text.count('"POST /v1/completions')

    def stop(self) -> None:
        try:
            stop_process(self.proc, 10)
        finally:
            self._log_file.close()

    def __enter__(self) -> "LocalCloud":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class FaultProxy:
    """HTTP proxy to the cloud. ``mode``: pass | 500 | malformed | slow | slow-first | cut | drip | reset. Counts the
    requests it received (from many handler threads, so under a lock). "slow-first" stalls only the first request;
    "drip" answers at once but sends each line ``drip`` seconds after the last (a long answer, streamed slowly)."""

    def __init__(self, upstream_port: int) -> None:
        self.mode = "pass"
        self.delay = 3.0  # seconds, for "slow" and "slow-first"
        self.drip = 0.3  # seconds between lines, for "drip"
        self.fail_after: int | None = None  # answer 500 to every POST after this many
        self.count = 0
        self._lock = threading.Lock()
        self.stopped = threading.Event()  # a request stalled past its test is dropped, not sent on to the shared cloud
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                self._forward(b"")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with proxy._lock:
                    proxy.count += 1
                    n = proxy.count
                mode = proxy.mode
                if mode == "500" or proxy.fail_after is not None and n > proxy.fail_after:
                    return self._send(500, b'{"error": "boom"}')
                if mode == "reset":  # the connection is dropped before any answer, as a refusing host does
                    self.close_connection = True
                    return self.connection.shutdown(socket.SHUT_RDWR)
                if mode == "malformed":
                    return self._send(200, b'{"choices": [ this is not json')
                if mode == "slow" or mode == "slow-first" and n == 1:
                    if proxy.stopped.wait(proxy.delay):
                        return

                self._forward(body, cut=mode == "cut", drip=proxy.drip if mode == "drip" else 0.0)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes, cut: bool = False, drip: float = 0.0) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {"content-type": "application/json"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                r = conn.getresponse()
                self.send_response(r.status)
                self.send_header("content-type", r.getheader("content-type", "application/json"))
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    self._copy(r, cut, drip)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (deadline): fine
                    pass
                conn.close()

            def _copy(self, r, cut: bool, drip: float = 0.0) -> None:
                events = 0
                while True:
                    line = r.readline()
                    if not line:
                        break
                    if drip and line.startswith(b"data:") and events and proxy.stopped.wait(drip):
                        return
                    self.wfile.write(line)
                    self.wfile.flush()
                    if line.startswith(b"data:"):
                        events += 1
                        if cut and events == 3:  # three deltas, then the connection drops
                            self.wfile.flush()
                            self.connection.shutdown(socket.SHUT_RDWR)
                            break

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
