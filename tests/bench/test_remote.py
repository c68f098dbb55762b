"""`edgelm bench --device ssh://` against a real OpenSSH server on 127.0.0.1 (Debian's openssh-server, a throwaway
key, a port of its own, stopped by the fixture), and `--device qemu-aarch64` running the aarch64 llama-bench under
qemu-user. Nothing here dials beyond loopback."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgelm.bench.api import bench
from edgelm.bench.remote import runner_binary
from edgelm.errors import EdgelmError

HOST_ARCH = platform.machine()


def need(why: str | None) -> None:
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"cannot run in CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on a free loopback port, accepting one throwaway key (edgelm.bench.loopback)."""
    from edgelm.bench.loopback import SSHD, LoopbackSshd

    need(None if Path(SSHD).is_file() else "openssh-server is missing (make sshd)")
    need(None if runner_binary(HOST_ARCH) else f"llama-bench-{HOST_ARCH} is missing (make llama-bench)")
    with LoopbackSshd(tmp_path_factory.mktemp("sshd")) as d:
        yield {"spec": d.spec, "config": d.config, "stranger": d.stranger}


def test_ssh_rows_are_llama_bench_figures_with_the_devices_facts(sshd, artifacts, tmp_path):
    out = tmp_path / "b.json"
    bench(models=(str(artifacts["llamacpp"]),), device=sshd["spec"], ssh_config=sshd["config"],
          remote_dir=str(tmp_path / "device"), threads=(1, 2), prompt_len=64, gen_len=64, repeat=3, sustained=3,
          json=str(out), progress=False)
    data = json.loads(out.read_text())
    (dev,) = data["header"]["devices"]
    assert dev["id"] == sshd["spec"] and dev["kind"] == "ssh" and dev["machine"] == HOST_ARCH
    assert dev["logical_cores"] == os.cpu_count() and dev["memory_bytes"] > 0 and dev["cpu"]
    assert [r["threads"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        assert not r["error"], r["error"]
        assert r["device"] == sshd["spec"] and r["runtime"] == "llama-bench"
        assert r["pp_tps_mean"] > 0 and r["tg_tps_mean"] > 0 and r["tg_tps_std"] >= 0
        assert len(r["tg_tps_runs"]) == 3 and all(t > 0 for t in r["tg_tps_runs"])
        size = (artifacts["llamacpp"] / "model.gguf").stat().st_size
        assert r["size_bytes"] == size and r["peak_rss_bytes"] > size  # the model is mapped and read
        # llama-bench's own field names, filled alike
        assert (r["n_prompt"], r["n_gen"], r["n_threads"], r["model_size"]) == (64, 64, r["threads"], size)
        assert r["avg_ts"] == r["tg_tps_mean"] and r["cpu_info"] and r["test_time"]
        assert r["load_s"] is None and r["ttft_ms_mean"] is None and "not the load or the first token" in r["notes"] and "decode at depth 64" in r["notes"]
    pushed = sorted(p.relative_to(tmp_path / "device").as_posix() for p in (tmp_path / "device").rglob("*")
                    if p.is_file())
    assert sorted(Path(p).name for p in pushed) == sorted(["model.gguf", f"llama-bench-{HOST_ARCH}"])
    stamp = {p: (tmp_path / "device" / p).stat().st_mtime_ns for p in pushed}
    bench(models=(str(artifacts["llamacpp"]),), device=sshd["spec"], ssh_config=sshd["config"],
          remote_dir=str(tmp_path / "device"), threads=(1,), prompt_len=16, gen_len=8, repeat=1, progress=False)
    assert {p: (tmp_path / "device" / p).stat().st_mtime_ns for p in pushed} == stamp  # cached: nothing pushed


def test_ssh_refusals_are_one_line_and_write_nothing(sshd, artifacts, tmp_path):
    gguf = str(artifacts["llamacpp"])
    out = tmp_path / "b.json"
    common = dict(models=(gguf,), json=str(out), progress=False, remote_dir=str(tmp_path / "device"))
    with pytest.raises(EdgelmError, match="refused the key"):
        bench(device=sshd["spec"], ssh_config=sshd["stranger"], **common)
    from edgelm.coop.localcloud import free_port

    with pytest.raises(EdgelmError, match="could not connect"):
        bench(device=f"ssh://127.0.0.1:{free_port()}", ssh_config=sshd["config"], wait=5, **common)
    with pytest.raises(EdgelmError, match="is a onnx model; --device ssh runs gguf, tvm artifacts"):
        bench(device=sshd["spec"], ssh_config=sshd["config"], **{**common, "models": (str(artifacts["onnx"]),)})
    with pytest.raises(EdgelmError, match="write ssh://"):
        bench(device="ssh://", **common)
    assert not out.exists()


def test_a_device_without_space_is_refused_before_pushing(sshd, artifacts, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True, text=True)
    need(None if r.returncode == 0 else f"cannot mount a small tmpfs here ({r.stderr.strip()})")
    try:
        with pytest.raises(EdgelmError, match=r"MiB free under .* need .* free space on the device"):
            bench(models=(str(artifacts["llamacpp"]),), device=sshd["spec"], ssh_config=sshd["config"],
                  remote_dir=str(small / "cache"), progress=False)
        assert not any(small.rglob("*.part"))
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_qemu_aarch64_runs_the_aarch64_llama_bench_with_the_same_row_shape(artifacts, sshd, tmp_path):
    need(None if shutil.which("qemu-aarch64-static") else "qemu-user-static is missing")
    need(None if runner_binary("aarch64") else "llama-bench-aarch64 is missing (make llama-bench)")
    common = dict(models=(str(artifacts["llamacpp"]),), threads=(1,), prompt_len=8, gen_len=4, repeat=1,
                  progress=False)
    emu = bench(device="qemu-aarch64", **common)
    host = bench(device=sshd["spec"], ssh_config=sshd["config"], remote_dir=str(tmp_path / "device"), **common)
    (e,), (h,) = emu.rows, host.rows
    assert not e["error"], e["error"]
    assert emu.header["devices"][0]["machine"] == "aarch64" and emu.header["devices"][0]["emulated"]
    assert "emulated" in e["notes"]
    filled = lambda r: sorted(k for k, v in r.items() if v is not None and k not in ("device", "notes"))
    assert filled(e) == filled(h)


def test_ssh_tvm_rows_run_the_tvm_runner_under_the_devices_python(sshd, artifacts, tiny_corpus, tmp_path):
    res = bench(models=(str(artifacts["tvm"]),), device=sshd["spec"], ssh_config=sshd["config"],
                remote_dir=str(tmp_path / "device"), device_python=sys.executable, threads=(1,), prompt_len=16,
                gen_len=8, repeat=2, sustained=2, data=(str(tiny_corpus),), progress=False)
    (r,) = res.rows
    assert not r["error"], r["error"]
    assert r["runtime"] == "tvm" and r["threads"] == 1 and r["load_s"] > 0 and r["ttft_ms_mean"] > 0
    assert r["pp_tps_mean"] > 0 and r["tg_tps_mean"] > 0 and len(r["tg_tps_runs"]) == 2 and r["peak_rss_bytes"] > 0
    with pytest.raises(EdgelmError, match="cannot import tvm and numpy; pip install apache-tvm=="):
        bench(models=(str(artifacts["tvm"]),), device=sshd["spec"], ssh_config=sshd["config"],
              remote_dir=str(tmp_path / "device"), device_python="/bin/false", progress=False)


@pytest.fixture(scope="module")
def tvm_aarch64(tmp_path_factory, artifacts, tiny_corpus):
    """The tiny model's TVM library for aarch64 (cross-built with Debian's g++)."""
    from edgelm.artifact.api import export

    need(None if shutil.which("aarch64-linux-gnu-g++") else "aarch64-linux-gnu-g++ is missing (make cross-gxx)")
    out = tmp_path_factory.mktemp("tvm-aarch64") / "tvm-aarch64"
    export(model=str(artifacts["torch"]), target="tvm", quant="fp32", arch="aarch64", out=str(out),
           data=(str(tiny_corpus),))
    return out


def test_a_library_for_another_cpu_is_refused(sshd, tvm_aarch64, tmp_path):
    with pytest.raises(EdgelmError, match=f"built for aarch64 and {sshd['spec']} is {HOST_ARCH}; export it with"):
        bench(models=(str(tvm_aarch64),), device=sshd["spec"], ssh_config=sshd["config"],
              remote_dir=str(tmp_path / "device"), device_python=sys.executable, progress=False)
    assert not (tmp_path / "device").exists()  # refused before anything was pushed


def test_qemu_aarch64_runs_the_aarch64_tvm_library_in_the_arm64_root(tvm_aarch64, tiny_corpus):
    from tests.conftest import ROOT

    root = ROOT / "build" / "arm64-root"
    need(None if (root / ".done").is_file() else "build/arm64-root is missing (make tvm-aarch64)")
    res = bench(models=(str(tvm_aarch64),), device="qemu-aarch64", qemu_root=str(root), threads=(1,), prompt_len=8,
                gen_len=4, repeat=1, data=(str(tiny_corpus),), progress=False)
    (r,) = res.rows
    assert not r["error"], r["error"]
    assert r["runtime"] == "tvm" and r["tg_tps_mean"] > 0 and "emulated" in r["notes"]
