"""Every registered `--device` kind has its tests (a new kind without them fails here) and parses its spec with a
one-line error; the table and JSON of a run on another device keep the local run's fields."""
from __future__ import annotations

import pytest

from edgelm.bench.api import ROW_FIELDS, bench
from edgelm.errors import EdgelmError
from edgelm.registry import DEVICES

# kind -> (a malformed spec, what its error says, the tests that run it for real)
TESTED = {
    "local": ("local:2", "plain 'local'", "tests/bench/test_bench.py"),
    "ssh": ("ssh://user@host:port", "write ssh://", "tests/bench/test_remote.py"),
    "qemu-aarch64": ("qemu-aarch64:x", "write qemu-aarch64", "tests/bench/test_remote.py"),
    "rpc": ("rpc://host", "write rpc://HOST:PORT", "tests/bench/test_rpc.py"),
    "browser": ("browser:99999", "write browser or browser:PORT", "tests/app/test_benchpage.py"),
}


@pytest.mark.parametrize("name", DEVICES.names())
def test_every_device_kind_is_tested_and_refuses_a_bad_spec(name, artifacts, tmp_path):
    from tests.conftest import ROOT

    assert name in TESTED, f"--device {name} has no tests: add it to TESTED with the tests that run it"
    spec, message, tests = TESTED[name]
    assert name in (ROOT / tests).read_text(), f"{tests} does not run --device {name}"
    out = tmp_path / "b.json"
    with pytest.raises(EdgelmError, match=message):
        bench(models=(str(artifacts["llamacpp"]),), device=spec, json=str(out), progress=False)
    assert not out.exists()


def test_an_unknown_device_kind_lists_the_known_ones(artifacts):
    with pytest.raises(EdgelmError, match="unknown device kind 'adb'; use one of browser, local, qemu-aarch64, rpc, "
                                          "ssh"):
        bench(models=(str(artifacts["llamacpp"]),), device="adb://phone")


def test_quality_runs_here_only(artifacts):
    with pytest.raises(EdgelmError, match="run on this machine only; drop them for --device ssh://pi@board"):
        bench(models=(str(artifacts["llamacpp"]),), device="ssh://pi@board", quality=True)


def test_rows_carry_llama_bench_fields_beside_edgelms():
    for f in ("n_prompt", "n_gen", "n_threads", "model_size", "avg_ts", "stddev_ts", "test_time", "cpu_info"):
        assert f in ROW_FIELDS
