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
    art = read_manifest(artifacts["llamacpp"])
    (m,) = app["models"]
    assert app["default_model"] == m["name"] == artifacts["llamacpp"].name
    assert m["runtime"] == "wllama" and m["path"] == f"models/{m['name']}/model.gguf"
    assert m["sha256"] == art["files"]["model.gguf"]["sha256"] and m["bytes"] == art["files"]["model.gguf"]["size"]
    assert (app_dir / m["path"]).stat().st_size == m["bytes"]
    r = m["route"]
    assert r["router"] == "confidence-topn" and r["params"] == {"k": 8, "n": 5} and math.isfinite(r["threshold"])
    assert r["budget"] == 0.3 and r["calibration"]["prompts"] == 8
    assert app["privacy"] == detector_table()
    assert check_app(app_dir)["kind"] == "app"
    for f in ("index.html", "app.js", "sw.js", "vendor/wllama/index.js", "vendor/wllama/single-thread/wllama.wasm"):
        assert (app_dir / f).is_file(), f


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


def test_bad_input(artifacts, tmp_path):
    from edgelm.app.build import build_app
    from edgelm.coop.routers import RouterState

    gguf = str(artifacts["llamacpp"])
    with pytest.raises(EdgelmError, match="'export-onnx' artifact; the app runs gguf artifacts"):
        build_app(artifacts=(str(artifacts["onnx"]),), out=str(tmp_path / "a"))
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
    r = run_cli("app", "build", str(artifacts["onnx"]), "--out", str(tmp_path / "a"))
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
