"""LocalCloud closes its server log on every path (a server that fails to start included)."""
from __future__ import annotations

import gc
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
