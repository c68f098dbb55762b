"""`edgelm app build`: what app.json tells the page, and one-line refusals of what the app cannot run."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from edgelm.errors import EdgelmError
from tests.conftest import run_cli


def test_app_json_lists_models_files_router_and_privacy_rules(app_dir, artifacts):
    from edgelm.app.serve import check_app
    from edgelm.coop.privacy import detector_table
    from edgelm.manifest import read_manifest

    app = json.loads((app_dir / "app.json").read_text())
    gguf, onnx = app["models"]
    assert app["default_model"] == gguf["name"] == artifacts["llamacpp"].name and onnx["name"] == "onnx"
    assert gguf["runtime"] == "wllama" and onnx["runtime"] == "ort"
    assert [f["name"] for f in gguf["files"]] == ["model.gguf"] and gguf["file"] == "model.gguf"
    assert [f["name"] for f in onnx["files"]] == ["model.onnx", "model.onnx.data", "genai_config.json",
                                                  "tokenizer.json", "tokenizer_config.json"]
    for m, backend in ((gguf, "llamacpp"), (onnx, "onnx")):
        art = read_manifest(artifacts[backend])
        for f in m["files"]:
            assert f["sha256"] == art["files"][f["name"]]["sha256"] and f["bytes"] == art["files"][f["name"]]["size"]
            assert (app_dir / f["path"]).stat().st_size == f["bytes"]
        assert m["bytes"] == sum(f["bytes"] for f in m["files"])
        r = m["route"]
        assert r["router"] == "confidence-topn" and r["params"] == {"k": 8, "n": 5} and math.isfinite(r["threshold"])
        assert r["budget"] == 0.3 and r["calibration"]["prompts"] == 8
    # the chat template around a message, as Python renders it
    from edgelm.runtimes.text import TextTokenizer

    msg = [{"role": "user", "content": "hi"}]
    assert gguf["chat"]["prefix"] + "hi" + gguf["chat"]["suffix"] == \
        TextTokenizer.from_folder(artifacts["llamacpp"]).apply_chat_template(msg)
    assert app["privacy"] == detector_table()
    assert check_app(app_dir)["kind"] == "app"
    for f in ("index.html", "app.js", "sw.js", "vendor/wllama/index.js", "vendor/wllama/single-thread/wllama.wasm",
              "vendor/ort/ort-wasm-simd-threaded.wasm", "vendor/tokenizers/tokenizers.min.mjs"):
        assert (app_dir / f).is_file() and f in app["shell"], f
    assert not [f for f in app["shell"] if f.startswith("models/")]


@pytest.mark.parametrize("router, threshold", [("always-cloud", -math.inf), ("always-device", math.inf)])
def test_a_router_file_is_taken_as_it_is(artifacts, tmp_path, router, threshold):
    from edgelm.app.build import build_app
    from edgelm.coop.routers import RouterState

    RouterState(router, threshold).save(tmp_path / "r.json")
    build_app(artifacts=(str(artifacts["llamacpp"]),), out=str(tmp_path / "app"), router=str(tmp_path / "r.json"))
    text = (tmp_path / "app" / "app.json").read_text()
    route = json.loads(text)["models"][0]["route"]
    assert route["router"] == router and abs(route["threshold"]) == 1e300  # JSON has no infinity
    assert "Infinity" not in text
    shell = json.loads(text)["shell"]  # GGUF only: onnxruntime-web is not copied
    assert "vendor/wllama/index.js" in shell and not [f for f in shell if f.startswith(("vendor/ort", "vendor/tok"))]
    assert not (tmp_path / "app" / "vendor" / "ort").exists()


def test_bad_input(artifacts, tmp_path):
    from edgelm.app.build import build_app
    from edgelm.coop.routers import RouterState

    gguf = str(artifacts["llamacpp"])
    from edgelm.manifest import write_manifest

    other = tmp_path / "quantized"
    other.mkdir()
    write_manifest(other, "quantized")
    with pytest.raises(EdgelmError, match="'quantized' artifact; the app runs gguf and onnx artifacts"):
        build_app(artifacts=(str(other),), out=str(tmp_path / "a"))
    with pytest.raises(EdgelmError, match="is not an artifact folder"):
        build_app(artifacts=(str(tmp_path / "nope"),), out=str(tmp_path / "a"))
    RouterState("confidence", 1.0).save(tmp_path / "r.json")
    with pytest.raises(EdgelmError, match="which the page cannot compute"):
        build_app(artifacts=(gguf,), out=str(tmp_path / "a"), router=str(tmp_path / "r.json"))
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html>")
    with pytest.raises(EdgelmError, match="make app-deps"):
        build_app(artifacts=(gguf,), out=str(tmp_path / "a"), web=str(web))
    with pytest.raises(EdgelmError, match="share the folder name"):
        build_app(artifacts=(gguf, gguf), out=str(tmp_path / "a"))
    with pytest.raises(EdgelmError, match="between 0 and 1"):
        build_app(artifacts=(gguf,), out=str(tmp_path / "a"), cloud_budget=2.0)
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_cli_refuses_in_one_line(artifacts, app_dir, tmp_path):
    r = run_cli("app", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("edgelm: error:") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("app", "build", str(artifacts["llamacpp"]), "--out", str(app_dir))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def test_changed_app_folder_is_refused(app_dir, tmp_path):
    copy = tmp_path / "app"
    shutil.copytree(app_dir, copy)
    (copy / "app.js").write_text("// changed")
    r = run_cli("app", "serve", str(copy))
    assert r.returncode == 2 and "does not match the sha256" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("app", "serve", str(tmp_path))
    assert r.returncode == 2 and "is not an app folder" in r.stderr


def test_a_wheel_install_builds_the_app(artifacts, tmp_path):
    """The page ships as package data: built as a wheel and installed in a fresh venv (its dependencies seen from
    this one's site-packages, never this checkout), `edgelm app build` finds the page and its runtime files."""
    import os
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    if not (repo / "android_demo" / "www" / "vendor" / "wllama" / "index.js").is_file():
        if os.environ.get("CI"):
            pytest.fail("the app's npm packages are missing under CI (make app-deps)")
        pytest.skip("the app's npm packages are missing (make app-deps)")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "whl"), str(repo)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "whl").glob("edgelm-*.whl")
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "-q",
                        "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fresh_site = Path(subprocess.check_output([str(fresh / "bin" / "python"), "-c",
                                               "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                              text=True).strip())
    # a path line: this venv's packages, without running its .pth files (the editable finder of this checkout)
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(fresh / "bin" / "python"), "-c", "import edgelm.app.build as b; print(b.__file__); "
                            "print(b.default_web())"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    mod, web = where.stdout.split()
    assert Path(mod).is_relative_to(fresh_site) and Path(web) == fresh_site / "edgelm" / "app" / "www"
    r = subprocess.run([str(fresh / "bin" / "edgelm"), "app", "build", str(artifacts["llamacpp"]), "--out",
                        str(tmp_path / "app")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    shell = json.loads((tmp_path / "app" / "app.json").read_text())["shell"]
    for f in ("index.html", "app.js", "vendor/wllama/index.js", "vendor/wllama/single-thread/wllama.wasm"):
        assert (tmp_path / "app" / f).is_file() and f in shell, f
