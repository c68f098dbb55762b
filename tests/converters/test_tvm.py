"""The TVM target: exact packing, agreement with the GGUF artifact of the same GPTQ codes, the aarch64 cross build,
tuning databases, and each bad input's one-line error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm.artifact.api import export
from edgelm.converters import tvm as T
from edgelm.errors import EdgelmError
from tests.conftest import CALIB, run_cli

CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)


def rows(a: np.ndarray) -> np.ndarray:
    """A stored [out/rb, n, rb] tensor back to [out, n]."""
    return a.transpose(0, 2, 1).reshape(a.shape[0] * a.shape[2], a.shape[1])


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    words = rows(words)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    return ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.uint8)


def test_pack_codes_round_trips():
    codes = np.random.default_rng(0).integers(0, 16, size=(48, 64), dtype=np.uint8)
    words = T.interleave_rows(T.pack_codes(codes, 4), 16)
    assert words.dtype == np.uint32 and words.shape == (3, 8, 16)
    assert np.array_equal(unpack(words, 4), codes)
    assert T.pack_codes(codes * 16, 8).dtype == np.uint8  # 8-bit codes stay bytes


def test_q8_0_is_gguf_pys():
    import gguf

    w = np.random.default_rng(1).normal(size=(4, 96)).astype(np.float32)
    codes, scales, zeros = T.q8_0(w)
    mine = scales.astype(np.float32).repeat(32, axis=1) * (codes.astype(np.float32) - zeros.repeat(32, axis=1))
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(mine, ref)


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory, quantized, tiny_corpus):
    """The TVM and GGUF artifacts of one gptq-int4-g32 checkpoint."""
    src = quantized("gptq-int4-g32")[0]
    root = tmp_path_factory.mktemp("tvm-int4")
    out = {}
    for target in ("tvm", "gguf"):
        out[target] = export(model=str(src), target=target, quant="gptq-int4-g32", out=root / target,
                             data=(str(tiny_corpus),), eval_seqs=8, eval_seqlen=128).manifest
    return src, root, out


def test_int4_keeps_the_checkpoints_codes(int4_pair):
    from safetensors.numpy import load_file

    from edgelm.models.qformat import read_quantized

    src, root, _ = int4_pair
    _, _, qlinears = read_quantized(src)
    params = load_file(str(root / "tvm" / T.PARAMS_FILE))
    q, k, v = (qlinears[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    got = unpack(params["layers.1.self_attn.qkv.qweight"], 4)
    assert np.array_equal(got, np.concatenate([q.codes.numpy(), k.codes.numpy(), v.codes.numpy()]))
    scales = rows(params["layers.1.self_attn.qkv.scales"])
    assert scales.dtype == np.float16 and np.array_equal(scales, np.concatenate([q.scales.numpy(), k.scales.numpy(),
                                                                                 v.scales.numpy()]))
    down = qlinears["model.layers.0.mlp.down_proj"]
    assert np.array_equal(unpack(params["layers.0.mlp.down_proj.qweight"], 4), down.codes.numpy())


def test_int4_agrees_with_the_gguf_of_the_same_codes(int4_pair):
    """Same codes and the same Q8_0 embedding: the two runtimes' quality losses nearly agree (llama.cpp also rounds
    activations to 8 bits in its Q4_0 dot products, TVM does not)."""
    _, _, m = int4_pair
    tvm_p, gguf_p = m["tvm"]["parity"], m["gguf"]["parity"]
    assert m["tvm"]["quantized_tensors"]["lm_head"] == 8 and len(m["tvm"]["quantized_tensors"]) == 15
    assert tvm_p["passed"] and tvm_p["ppl_ref"] == gguf_p["ppl_ref"]
    assert abs(tvm_p["kld"] - gguf_p["kld"]) <= 0.25 * gguf_p["kld"] + 0.002, (tvm_p["kld"], gguf_p["kld"])
    assert tvm_p["top1_agree"] > 0.9


def one_token_and_prompt_logits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """([T, V] logits of 12 ids fed one token at a time, [T, V] of the same ids as one prompt)."""
    from edgelm.runtimes.tvmrt import TvmRuntime

    ids = list(range(40, 52))
    rt = TvmRuntime(folder, threads=1)
    try:
        whole = rt.logits(ids)  # [T, V], every linear a matmul
        steps = np.stack([rt._prefill(ids[:1])] + [rt._step(t) for t in ids[1:]])  # [T, V], one token at a time
    finally:
        rt.close()
    assert np.abs(whole).max() > 1.0  # real logits, not zeros
    return steps, whole


def test_one_token_path_with_float_activations_gives_the_prompt_paths_logits(tmp_path, monkeypatch, int4_pair,
                                                                              tiny_corpus):
    """Without VNNI, decode runs each int4 linear as float group sums over interleaved rows (``QLinear._gemv_f32``),
    a prompt as a matmul on the dequantized matrix: token by token, the same ids give the same logits."""
    src = int4_pair[0]
    have = T.host_features()
    monkeypatch.setattr(T, "host_features", lambda: [f for f in have if f != "+avx512vnni"])
    export(model=str(src), target="tvm", quant="gptq-int4-g32", out=tmp_path / "f32", data=(str(tiny_corpus),),
           **CHECK)
    assert json.loads((tmp_path / "f32" / T.CONFIG_FILE).read_text())["decoder"]["int8_dot"] is False
    steps, whole = one_token_and_prompt_logits(tmp_path / "f32")
    np.testing.assert_allclose(steps, whole, rtol=1e-4, atol=1e-4)


def test_one_token_path_with_int8_activations_stays_near_the_prompt_path(int4_pair):
    """On a CPU with AVX-512 VNNI, decode rounds the quantized linears' activations to int8 per group of 32 (as
    llama.cpp's Q4_0 x Q8_0 dot products do); the prompt path keeps them float. The rounding error of an activation
    is at most 1/254 of its group's largest, so the two paths' logits differ by a fraction of a percent: bounded
    here by 0.5% of the logits' range and a KL divergence of 1e-4 nats per position."""
    _, root, m = int4_pair
    on = "+avx512vnni" in T.host_features()
    assert json.loads((root / "tvm" / T.CONFIG_FILE).read_text())["decoder"]["int8_dot"] is on
    assert m["tvm"]["activations"] == ("int8 in one token's quantized linears (AVX-512 VNNI)" if on else "float32")
    if not on:
        pytest.skip("needs an x86-64 CPU with AVX-512 VNNI")
    from edgelm.metrics import kl_divergence, top1_agreement

    steps, whole = one_token_and_prompt_logits(root / "tvm")
    diff = np.abs(steps - whole).max()
    assert 1e-6 < diff <= 5e-3 * (whole.max() - whole.min()), diff  # rounded (not the float path), and close
    per_position = [kl_divergence(w, s) for w, s in zip(whole, steps)]
    assert max(per_position) <= 1e-4, per_position
    assert top1_agreement(whole, steps) >= 0.9


def test_aarch64_cross_build(tmp_path, tiny_q_model, tiny_corpus):
    """`--device aarch64`: an AArch64 library, checked through the host build of the same module; this machine
    refuses to run it, in one line."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ is missing; `make test` installs g++-aarch64-linux-gnu")
    out = tmp_path / "arm"
    r = run_cli("export", str(tiny_q_model), "--target", "tvm", "--quant", "fp32", "--device", "aarch64",
                "--out", str(out), "--data", str(tiny_corpus), "--eval-seqs", "4", "--eval-seqlen", "64",
                "--prompts", "2", "--new-tokens", "8")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "edgelm.json").read_text())
    assert m["arch"] == "aarch64" and m["parity"]["passed"] and m["parity"]["greedy_identical"] == 2
    assert m["checked_on"].startswith("the x86-64 build")
    assert T.elf_machine(out / T.LIB_FILE) == 183
    if shutil.which("readelf"):
        head = subprocess.run(["readelf", "-h", str(out / T.LIB_FILE)], capture_output=True, text=True).stdout
        assert "AArch64" in head
    r = run_cli("generate", str(out), "def f(x):", "--max-new-tokens", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "built for aarch64, this machine is x86-64" in r.stderr and "--arch x86-64" in r.stderr


ARM64_ROOT = Path(__file__).resolve().parents[2] / "build" / "arm64-root"


def test_aarch64_library_runs_under_emulation(tmp_path, fp32_tvm, tiny_q_model, tiny_corpus):
    """The aarch64 library, run for real (an arm64 Python and TVM wheel under qemu-user, `make test` unpacks them):
    the same greedy tokens as the x86-64 build of the same model."""
    if not (ARM64_ROOT / ".done").is_file() or shutil.which("qemu-aarch64-static") is None:
        pytest.fail("no arm64 root or qemu-aarch64-static; `make test` builds build/arm64-root (make tvm-aarch64)")
    arm = tmp_path / "arm"
    export(model=str(tiny_q_model), target="tvm", quant="fp32", arch="aarch64", out=arm, data=(str(tiny_corpus),),
           **CHECK)
    greedy = Path(__file__).resolve().parents[2] / "runtimes" / "tvm_greedy.py"
    prompt = "5,6,7,8,9,10,11,12"
    x86 = subprocess.run([sys.executable, str(greedy), str(fp32_tvm), prompt, "12"], capture_output=True, text=True)
    assert x86.returncode == 0, x86.stderr
    py = ARM64_ROOT / "usr" / "bin" / "python3.11"
    a64 = subprocess.run(["qemu-aarch64-static", "-L", str(ARM64_ROOT), str(py), str(greedy), str(arm), prompt, "12"],
                         capture_output=True, text=True, timeout=600)
    assert a64.returncode == 0, a64.stderr[-2000:]
    ids = json.loads(a64.stdout.strip().splitlines()[-1])
    assert len(ids) == 12 and ids == json.loads(x86.stdout.strip().splitlines()[-1])


def test_missing_toolchain_names_the_package(monkeypatch, tmp_path, tiny_q_model):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EdgelmError, match=r"install the Debian package g\+\+-aarch64-linux-gnu"):
        export(model=str(tiny_q_model), target="tvm", quant="fp32", arch="aarch64", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(EdgelmError, match="TVM can't compile for 'riscv64' here; architectures: x86-64, aarch64"):
        T.get_arch("riscv64")


def test_five_bit_types_are_refused_before_any_work(tmp_path, tiny_q_model):
    with pytest.raises(EdgelmError, match="TVM target takes 4- and 8-bit codes; .*Q5_0"):
        export(model=str(tiny_q_model), target="tvm", quant="gptq-mixed", types=("Q4_0", "Q5_0"), out=tmp_path / "x")


@pytest.fixture(scope="module")
def fp32_tvm(tmp_path_factory, tiny_q_model, tiny_corpus):
    out = tmp_path_factory.mktemp("tvm-fp32") / "art"
    export(model=str(tiny_q_model), target="tvm", quant="fp32", out=out, data=(str(tiny_corpus),), **CHECK)
    return out


def test_library_of_another_tvm_is_refused(tmp_path, fp32_tvm):
    from edgelm.runtimes.tvmrt import TvmRuntime

    art = tmp_path / "old"
    shutil.copytree(fp32_tvm, art)
    cfg = json.loads((art / T.CONFIG_FILE).read_text())
    cfg["tvm"] = "0.19.0"
    (art / T.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(EdgelmError, match="built with TVM 0.19.0, this is TVM 0.27"):
        TvmRuntime(art)


def test_library_for_a_cpu_with_more_features_is_refused(monkeypatch, fp32_tvm):
    """A native x86-64 build uses this machine's AVX-512 (and VNNI for int8 activations): on a CPU without them it
    would die on an illegal instruction, so loading it there says so."""
    from edgelm.runtimes.tvmrt import TvmRuntime

    built = json.loads((fp32_tvm / T.CONFIG_FILE).read_text())["mattr"]
    assert "+avx2" in built or T.host_arch() != "x86-64"
    monkeypatch.setattr(T, "host_features", lambda: [])  # a CPU with none of them
    if T.host_arch() == "x86-64":
        with pytest.raises(EdgelmError, match="compiled for a CPU with .*avx2.*re-export it on this machine"):
            TvmRuntime(fp32_tvm)


def test_prompt_past_the_context_is_refused(fp32_tvm):
    from edgelm.runtimes.api import load

    with load(fp32_tvm, threads=1) as rt:
        assert rt.context == 512  # the tiny model's max_position_embeddings
        with pytest.raises(EdgelmError, match="the prompt has 600 tokens but the context holds 512"):
            rt.generate([5] * 600)
        with pytest.raises(EdgelmError, match="exceed the context of 512"):
            rt.logits([5] * 600)
        assert len(rt.greedy([5] * 500, 4)) == 4  # prefill in chunks up to the context


def test_tuning_db_for_other_shapes_is_ignored(tmp_path, caplog):
    db = tmp_path / "db"
    db.mkdir()
    for f in ("database_workload.json", "database_tuning_record.json"):
        (db / f).write_text("")
    (db / "key.json").write_text(json.dumps({"key": "0123456789abcdef"}))
    with caplog.at_level("WARNING"):
        assert T.usable_db(db, "fedcba9876543210") is None
    assert "for other shapes or another target" in caplog.text
    assert T.usable_db(db, "0123456789abcdef") == db


def test_tune_stores_and_reuses_its_database(tmp_path, monkeypatch, tiny_q_model, tiny_corpus):
    """--tune N keeps its database in the artifact and in the cache; the next export of the same shapes reuses it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = export(model=str(tiny_q_model), target="tvm", quant="fp32", tune=8, out=tmp_path / "a",
               data=(str(tiny_corpus),), **CHECK).manifest
    assert a["tuning"]["trials"] == 8 and (tmp_path / "a" / T.DB_DIR / "database_tuning_record.json").is_file()
    records = (tmp_path / "a" / T.DB_DIR / "database_tuning_record.json").read_text().splitlines()
    assert records, "tuning measured no candidate"
    b = export(model=str(tiny_q_model), target="tvm", quant="fp32", out=tmp_path / "b", data=(str(tiny_corpus),),
               **CHECK).manifest
    assert b["tuning"]["key"] == a["tuning"]["key"] and b["tuning"]["from"].startswith(str(tmp_path / "cache"))
    assert b["parity"]["passed"]
