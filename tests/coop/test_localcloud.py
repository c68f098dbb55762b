"""LocalCloud: a cloud on loopback that serves overlapping requests to the end, and closes its log on every path."""
from __future__ import annotations

import gc
import threading
import time
import warnings

import pytest

from edgelm.coop.localcloud import LocalCloud
from edgelm.errors import EdgelmError


def test_a_server_that_fails_to_start_leaves_no_open_log(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(EdgelmError, match="exited"):
            LocalCloud(tmp_path / "missing.gguf", tmp_path / "server.log", timeout=60)
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning) and "server.log" in str(w.message)]
    assert not leaks, leaks


def test_stop_closes_the_log(artifacts, tmp_path):
    cloud = LocalCloud(artifacts["llamacpp"] / "model.gguf", tmp_path / "server.log", n_ctx=256)
    cloud.stop()
    assert cloud.proc.poll() is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del cloud
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_overlapping_streams_each_run_to_the_end(artifacts, tmp_path):
    """llama-cpp-python's server cuts a stream short when another request arrives, unless told not to; a cloud must
    serve every client in full (a cut stream once made a cooperative-runtime test fail at random)."""
    from edgelm.cloud import CloudClient, CloudConfig

    payload = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 96, "min_tokens": 96,
               "temperature": 0}
    with LocalCloud(artifacts["llamacpp"] / "model.gguf", tmp_path / "server.log", n_ctx=512) as cloud:
        client = CloudClient(CloudConfig(url=cloud.url, read_timeout=60))
        solo = "".join(client.stream("chat/completions", payload, time.monotonic() + 60))
        got: dict[str, str] = {}

        def ask(key: str, delay: float) -> None:
            time.sleep(delay)
            got[key] = "".join(client.stream("chat/completions", payload, time.monotonic() + 60))

        threads = [threading.Thread(target=ask, args=(k, d)) for k, d in (("first", 0.0), ("second", 0.05))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
    assert len(solo) > 20 and got == {"first": solo, "second": solo}
