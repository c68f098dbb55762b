"""A cloud on this machine: llama-cpp-python's OpenAI-compatible server on 127.0.0.1, for the demo, the routing
benchmark and the tests. It logs every request it serves, which the privacy tests count."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from edgelm.errors import EdgelmError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self._log_file.close()

    def __enter__(self) -> "LocalCloud":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
