"""Bad input to quantize/export: one line, non-zero exit, no traceback, no partial artifact."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli


def _fails(r, *needles: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgelm: error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in last, last
    return last


def test_unsupported_architecture(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path / "gpt2")
    for target in ("gguf", "onnx"):
        r = run_cli("export", str(tmp_path / "gpt2"), "--target", target, "--out", str(tmp_path / "o"))
        _fails(r, "'gpt2'", "supported architectures: gemma3_text, llama, mistral, phi3, qwen2, qwen3, smollm3")
    r = run_cli("quantize", str(tmp_path / "gpt2"), "--quant", "int8", "--out", str(tmp_path / "o"))
    _fails(r, "supported architectures")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_truncated_checkpoint(command, tmp_path, tiny_q_model):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_q_model, bad)
    (bad / "edgelm.json").unlink()
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    quant = "fp32" if command == "export" else "int8"
    r = run_cli(command, str(bad), "--quant", quant, "--out", str(tmp_path / "o"))
    _fails(r, "corrupt")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_changed_file_fails_the_manifest(tmp_path, tiny_q_model):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_q_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cli("export", str(bad), "--out", str(tmp_path / "o"))
    _fails(r, "config.json does not match the sha256")


def test_truncated_gguf_input(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    r = run_cli("export", str(g), "--out", str(tmp_path / "o"))
    _fails(r)
    assert not (tmp_path / "o").exists()


def test_group_size_must_fit(tmp_path, tiny_teacher):
    # hidden 64 does not split into groups of 128
    r = run_cli("export", str(tiny_teacher), "--quant", "int4-g128", "--out", str(tmp_path / "o"))
    _fails(r, "not a multiple of int4-g128's group size 128")
    assert not (tmp_path / "o").exists()


def test_empty_calibration_set(tmp_path, tiny_q_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("quantize", str(tiny_q_model), "--quant", "gptq-int4-g32", "--out", str(tmp_path / "o"),
                "--data", str(empty), "--calib-samples", "4")
    _fails(r)
    assert not (tmp_path / "o").exists()
    r = run_cli("quantize", str(tiny_q_model), "--quant", "gptq-int4-g32", "--out", str(tmp_path / "o"),
                "--calib-samples", "2")
    _fails(r, "--calib-samples must be at least 4")


def test_output_exists_needs_force(tmp_path, tiny_q_model):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("export", str(tiny_q_model), "--out", str(out), "--no-check")
    _fails(r, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    r = run_cli("export", str(tiny_q_model), "--out", str(out), "--no-check", "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.gguf").is_file()


@pytest.mark.parametrize("args, needles", [
    (["--target", "tflite"], ["unknown export target 'tflite'", "known: gguf, onnx"]),
    (["--quant", "int3"], ["unknown quant preset 'int3'", "gptq-int4-g32"]),
    (["--target", "onnx", "--quant", "llamacpp-q4_k_m"], ["cannot be exported to onnx", "presets for onnx: "]),
    (["--quant", "int4-g32", "--act-order"], ["--act-order applies to GPTQ presets only"]),
    (["--quant", "int4-g32", "--max-kld", "0"], ["--max-kld must be > 0 nats, got 0.0"]),
])
def test_bad_names_and_options(args, needles, tmp_path, tiny_q_model):
    _fails(run_cli("export", str(tiny_q_model), "--out", str(tmp_path / "o"), *args), *needles)


def test_quantized_folder_exports_only_its_preset(tmp_path, quantized):
    folder, _ = quantized("int4-g32")
    r = run_cli("export", str(folder), "--quant", "int8", "--out", str(tmp_path / "o"))
    _fails(r, "was quantized with int4-g32")


def test_open_artifact_refuses_a_changed_or_newer_artifact(tmp_path, tiny_q_model):
    from edgelm.errors import EdgelmError
    from edgelm.artifact.api import export
    from edgelm.runtimes.api import open_artifact

    out = tmp_path / "a"
    export(model=tiny_q_model, target="gguf", quant="fp32", out=out, check=False)
    m = json.loads((out / "edgelm.json").read_text())
    with (out / "model.gguf").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(EdgelmError, match="model.gguf does not match the sha256"):
        open_artifact(out)
    m["schema_version"] = 99
    (out / "edgelm.json").write_text(json.dumps(m))
    with pytest.raises(EdgelmError, match="schema version 99"):
        open_artifact(out)


def test_onnx_refuses_a_per_row_block_that_is_not_a_power_of_two(tmp_path, tiny_tokenizer_dir):
    """int8 is one scale per row; rows of 96 columns are not a MatMulNBits block: refused before building."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tmp_path / "m", tiny_tokenizer_dir, layers=1, hidden=96, inter=192, heads=2, kv_heads=1)
    r = run_cli("export", str(model), "--target", "onnx", "--quant", "int8", "--out", str(tmp_path / "o"))
    _fails(r, "power-of-two blocks", "blocks of 96")
    assert not (tmp_path / "o").exists()


def test_max_kld_sets_the_quality_gate(tmp_path, tiny_q_model, tiny_corpus):
    """--max-kld replaces the preset's bound in the quality gate (what a random-weight benchmark model needs) and
    the manifest records the bound it passed; a bound below the artifact's KLD fails it with exit 4."""
    from edgelm.manifest import read_manifest

    common = ["--quant", "int4-g32", "--data", str(tiny_corpus), "--eval-seqs", "2", "--eval-seqlen", "32"]
    last = _fails(run_cli("export", str(tiny_q_model), "--out", str(tmp_path / "a"), *common, "--max-kld", "1e-9"),
                  "int4-g32 quality check failed: KL divergence", "> 1e-09", code=4)
    assert not (tmp_path / "a").exists(), last
    r = run_cli("export", str(tiny_q_model), "--out", str(tmp_path / "b"), *common, "--max-kld", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_manifest(tmp_path / "b")["parity"]["max_kld"] == 3.0
