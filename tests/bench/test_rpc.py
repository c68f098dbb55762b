"""`edgelm bench --device rpc://`: TVM's RPC, against a server on 127.0.0.1 running under qemu-aarch64 in the arm64
root (an aarch64 device, emulated) and one running natively (x86-64)."""
from __future__ import annotations

import sys

import pytest

from edgelm.bench.api import bench
from edgelm.errors import EdgelmError
from tests.bench.test_remote import need, tvm_aarch64  # noqa: F401 - the aarch64 library fixture
from tests.conftest import ROOT



@pytest.fixture(scope="module")
def rpc_aarch64():
    import shutil

    from edgelm.bench.loopback import LoopbackRpc

    root = ROOT / "build" / "arm64-root"
    need(None if (root / ".done").is_file() else "build/arm64-root is missing (make tvm-aarch64)")
    need(None if shutil.which("qemu-aarch64-static") else "qemu-user-static is missing")
    with LoopbackRpc.qemu_aarch64(root) as srv:
        yield srv.spec


def test_rpc_rows_from_an_aarch64_server(rpc_aarch64, tvm_aarch64, tiny_corpus, tmp_path):  # noqa: F811
    out = tmp_path / "b.json"
    res = bench(models=(str(tvm_aarch64),), device=rpc_aarch64, threads=(1,), prompt_len=16, gen_len=8, repeat=2,
                sustained=2, data=(str(tiny_corpus),), json=str(out), progress=False)
    (r,) = res.rows
    assert not r["error"], r["error"]
    (dev,) = res.header["devices"]
    assert dev["machine"] == "aarch64" and dev["kind"] == "rpc" and r["device"] == rpc_aarch64
    assert r["runtime"] == "tvm" and r["threads"] == 1 and r["load_s"] > 0 and r["ttft_ms_mean"] > 0
    assert r["pp_tps_mean"] > 0 and r["tg_tps_mean"] > 0 and len(r["tg_tps_runs"]) == 2
    assert r["peak_rss_bytes"] is None and "does not report it" in r["notes"]
    assert out.is_file()


def test_rpc_refusals(rpc_aarch64, artifacts, tvm_aarch64, tmp_path):  # noqa: F811
    from edgelm.coop.localcloud import free_port

    out = tmp_path / "b.json"
    with pytest.raises(EdgelmError, match=f"is built for x86-64 and {rpc_aarch64} is aarch64; export it with --arch "
                                          "aarch64"):
        bench(models=(str(artifacts["tvm"]),), device=rpc_aarch64, json=str(out), progress=False)
    from edgelm.bench.loopback import LoopbackRpc

    with LoopbackRpc([sys.executable]) as native:
        with pytest.raises(EdgelmError, match=f"is built for aarch64 and {native.spec} is x86_64"):
            bench(models=(str(tvm_aarch64),), device=native.spec, json=str(out), progress=False)
    with pytest.raises(EdgelmError, match="could not connect to the TVM RPC server"):
        bench(models=(str(tvm_aarch64),), device=f"rpc://127.0.0.1:{free_port()}", json=str(out), progress=False)
    with pytest.raises(EdgelmError, match="runs tvm artifacts"):
        bench(models=(str(artifacts["llamacpp"]),), device=rpc_aarch64, json=str(out), progress=False)
    with pytest.raises(EdgelmError, match="write rpc://HOST:PORT"):
        bench(models=(str(tvm_aarch64),), device="rpc://nowhere", json=str(out), progress=False)
    assert not out.exists()
