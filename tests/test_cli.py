from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_cli


def test_help_imports_no_heavy_modules():
    code = (
        "import sys, edgelm, edgelm.cli; edgelm.cli.build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'tvm', 'numpy') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("distill", "eval", "quantize", "export", "demo", "list"):
        assert cmd in r.stdout


def test_every_command_prints_its_help():
    from edgelm.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "qat" in commands
    for name, sub in commands.items():
        assert sub.format_help(), name  # a '%' in a field's comment broke argparse's formatting once


def test_every_distill_flag_is_an_api_argument():
    import dataclasses

    from edgelm.cli import build_parser
    from edgelm.distill.config import DistillConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["distill"]
    dests = {a.dest for a in sub._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(DistillConfig)}


def test_every_quantize_and_export_flag_is_an_api_argument():
    import dataclasses

    from edgelm.artifact.config import ExportConfig
    from edgelm.quant.config import QuantizeConfig
    from edgelm.cli import build_parser

    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    for cmd, cls in (("quantize", QuantizeConfig), ("export", ExportConfig)):
        dests = {a.dest for a in choices[cmd]._actions} - {"help"}
        assert dests == {f.name for f in dataclasses.fields(cls)}, cmd
        assert all(a.help for a in choices[cmd]._actions), cmd  # every flag documented from its field comment


def test_list_shows_registries():
    r = run_cli("list")
    assert r.returncode == 0
    for name in ("smollm2-135m-instruct", "forward_kl", "reverse_kl", "jsd", "nano", "gptq-int4-g32", "llamacpp-q4_k_m",
                 "gguf", "onnx"):
        assert name in r.stdout
    q = run_cli("list", "quants")
    assert q.returncode == 0 and "4.50  gguf,onnx" in q.stdout and "forward_kl" not in q.stdout


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("edgelm"), r.stderr
    return lines[-1]


def test_out_of_range_flag_is_one_line(tmp_path):
    r = run_cli("distill", "--alpha", "1.5", "--max-steps", "1", "--out", str(tmp_path / "r"))
    msg = _one_line_error(r)
    assert "--alpha must be between 0 and 1" in msg
    assert not (tmp_path / "r").exists()


def test_bad_flag_type_is_one_line():
    r = run_cli("distill", "--batch-size", "many")
    msg = _one_line_error(r)
    assert "--batch-size" in msg and "invalid int" in msg


def test_unknown_loss_lists_known(tmp_path):
    r = run_cli("distill", "--loss", "nope", "--max-steps", "1", "--out", str(tmp_path / "r"))
    msg = _one_line_error(r)
    assert "unknown KD loss 'nope'" in msg and "forward_kl" in msg and "jsd" in msg


@pytest.mark.parametrize("flag", ["--quant", "--app-quant"])
def test_demo_refuses_an_unknown_preset_before_training(flag, tmp_path):
    r = run_cli("demo", flag, "nope", "--out", str(tmp_path / "d"))
    msg = _one_line_error(r)
    assert "unknown quant preset 'nope'" in msg and "gptq-int4-g32-all" in msg
    assert not (tmp_path / "d").exists()


def test_demo_refuses_negative_qat_minutes_before_training(tmp_path):
    msg = _one_line_error(run_cli("demo", "--qat-minutes", "-1", "--out", str(tmp_path / "d")))
    assert "--qat-minutes must be at least 0 (0 skips QAT), got -1" in msg
    assert not (tmp_path / "d").exists()


def test_missing_budget(tmp_path):
    msg = _one_line_error(run_cli("distill", "--out", str(tmp_path / "r")))
    assert "--max-steps" in msg


def test_missing_teacher_is_one_line(tmp_path):
    r = run_cli("distill", "--teacher", str(tmp_path / "nothing-here"), "--max-steps", "1", "--out", str(tmp_path / "r"))
    msg = _one_line_error(r)
    assert "not found" in msg
    assert not (tmp_path / "r" / "student").exists()


def test_help_shows_no_empty_defaults():
    for cmd in ("distill", "quantize", "export", "serve", "bench", "demo"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())  # argparse wraps lines
        assert "(default: )" not in text and "(default: None)" not in text, cmd
        assert "(default: " in text  # real defaults are still shown
