"""Bad input to edgelm.load / `edgelm generate`: one line, non-zero exit, no traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from edgelm.errors import EdgelmError
from tests.conftest import run_cli


def _one_line_error(r, pattern: str) -> None:
    import re

    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("edgelm: error:")]
    assert len(err) == 1 and re.search(pattern, err[0]), r.stderr


def test_missing_artifact(tmp_path):
    _one_line_error(run_cli("generate", str(tmp_path / "nope"), "hi"), "does not exist")


def test_folder_without_a_model(tmp_path):
    _one_line_error(run_cli("generate", str(tmp_path), "hi"), "holds no model")


def test_changed_artifact_is_refused(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts["llamacpp"], art)
    with (art / "model.gguf").open("r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    _one_line_error(run_cli("generate", str(art), "hi"), "model.gguf does not match the sha256 in edgelm.json")


def test_truncated_onnx_artifact_is_refused(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts["onnx"], art)
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[: len(data) // 2])
    _one_line_error(run_cli("generate", str(art), "hi"), "does not match the sha256")


@pytest.mark.parametrize("backend, module, extra", [("llamacpp", "llama_cpp", "llamacpp"),
                                                    ("onnx", "onnxruntime_genai", "onnx"), ("tvm", "tvm", "tvm")])
def test_runtime_not_installed_names_the_extra(backend, module, extra, artifacts):
    """The library is hidden from the import system, as on a machine without the extra."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from edgelm.cli import main\n"
            f"sys.exit(main(['generate', {str(artifacts[backend])!r}, 'hi']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    _one_line_error(r, rf"{module} is not installed; pip install 'edgelm\[{extra}\]'")


def test_prompt_longer_than_the_context(artifacts):
    _one_line_error(run_cli("generate", str(artifacts["llamacpp"]), "def f(x):\n    return x + 1\n" * 4,
                            "--context", "16"), r"the prompt has \d+ tokens but the context holds 16")


@pytest.mark.parametrize("flags, pattern", [
    (["--top-p", "1.5"], r"top_p=1.5: must be in \(0, 1\]"),
    (["--temperature", "0", "--do-sample"], "temperature=0.0: must be > 0"),
    (["--threads", "0"], "threads must be a whole number >= 1, got 0"),
    (["--num-beams", "2", "--do-sample"], "beam search is deterministic"),
])
def test_invalid_settings(flags, pattern, artifacts):
    _one_line_error(run_cli("generate", str(artifacts["onnx"]), "hi", *flags), pattern)


def test_runtime_that_cannot_open_the_format(artifacts):
    _one_line_error(run_cli("generate", str(artifacts["onnx"]), "hi", "--runtime", "llamacpp"),
                    "runtime 'llamacpp' cannot open a onnx model .*; runtimes that can: onnx")


def test_unknown_runtime_lists_the_known_ones(artifacts):
    from edgelm.runtimes.api import load

    with pytest.raises(EdgelmError, match="unknown runtime 'mlc'; known: llamacpp, onnx, torch, tvm"):
        load(artifacts["onnx"], runtime="mlc")


def test_generate_cli_streams_the_text(artifacts, rt_model):
    from tests.runtime_fixtures import LONG, PROMPT

    r = run_cli("generate", str(artifacts["llamacpp"]), PROMPT, "--max-new-tokens", "24", "--min-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert LONG in r.stdout and "llamacpp: " in r.stderr and "thread(s)" in r.stderr and "24 new tokens (length)" in r.stderr
