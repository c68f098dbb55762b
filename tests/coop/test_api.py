"""edgelm.coop.api closes what it opened on every path: the device runtime and the cloud client."""
from __future__ import annotations

import pytest

from edgelm.errors import EdgelmError
from tests.cloud_fixtures import free_port


@pytest.fixture()
def closes(monkeypatch):
    """Count close() calls of cloud clients and runtimes (the real close still runs)."""
    from edgelm.cloud import CloudClient
    from edgelm.runtimes.base import Runtime

    seen = {"cloud": 0, "device": 0}
    for key, cls in (("cloud", CloudClient), ("device", Runtime)):
        real = cls.close

        def close(self, real=real, key=key):
            seen[key] += 1
            return real(self)

        monkeypatch.setattr(cls, "close", close)
    return seen


def test_route_train_closes_the_cloud_client_when_the_cloud_is_down(artifacts, tmp_path, closes):
    from edgelm.coop.api import route_train

    with pytest.raises(EdgelmError, match="does not answer"):
        route_train(device=str(artifacts["llamacpp"]), cloud_url=f"http://127.0.0.1:{free_port()}/v1",
                    out=str(tmp_path / "r.json"), queries=8, progress=False)
    assert closes["cloud"] == 1


def test_build_runtime_closes_the_device_when_calibration_fails(artifacts, tmp_path, closes):
    from edgelm.coop.api import build_runtime

    empty = tmp_path / "nofunctions.txt"
    empty.write_text("x = 1\n")
    with pytest.raises(EdgelmError, match="no calibration prompts"):
        build_runtime(device=str(artifacts["llamacpp"]), router="confidence", cloud_url="http://127.0.0.1:9/v1",
                      data=(str(empty),), threads=1)
    assert closes["device"] == 1 and closes["cloud"] == 1


def test_a_built_runtime_closes_both(artifacts, proxy, closes):
    from edgelm.coop.api import build_runtime

    coop, _ = build_runtime(device=str(artifacts["llamacpp"]), router="always-cloud", cloud_url=proxy.url, threads=1)
    coop.close()
    assert closes == {"device": 1, "cloud": 1}
