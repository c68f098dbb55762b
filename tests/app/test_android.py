"""The Android project (Capacitor 7) is checked in and in sync: running the sync script on a copy of android_demo
rewrites none of its checked-in files, and puts the page into the project's web assets. No APK is built here (no
Android SDK on this machine); android_demo/README.md gives the commands for a machine that has one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from edgelm.app.browser import DEMO
from tests.conftest import ROOT


def tracked(prefix: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def synced(tmp_path_factory, browser_ready):
    copy = tmp_path_factory.mktemp("android") / "android_demo"
    for f in tracked("android_demo"):
        dest = copy / f.removeprefix("android_demo/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest)
    # hard links, not a symlink: Capacitor writes the path it resolves into capacitor.settings.gradle
    shutil.copytree(DEMO / "node_modules", copy / "node_modules", copy_function=link_or_copy, symlinks=True)
    shutil.copytree(DEMO / "www" / "vendor", copy / "www" / "vendor")
    r = subprocess.run(["node", "scripts/sync.mjs"], cwd=copy, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return copy


def test_sync_rewrites_no_checked_in_file(synced):
    files = [f for f in tracked("android_demo/android")]
    assert "android_demo/android/app/src/main/AndroidManifest.xml" in files and len(files) > 30
    changed = [f for f in files if (synced / f.removeprefix("android_demo/")).read_bytes() != (ROOT / f).read_bytes()]
    assert not changed, f"the Android project is stale; run `npm run sync` in android_demo: {changed}"


def test_the_page_and_config_are_in_the_web_assets(synced):
    assets = synced / "android" / "app" / "src" / "main" / "assets"
    for f in ("index.html", "app.js", "device.js", "vendor/wllama/index.js", "vendor/wllama/single-thread/wllama.wasm"):
        assert (assets / "public" / f).read_bytes() == (DEMO / "www" / f).read_bytes(), f
    config = json.loads((assets / "capacitor.config.json").read_text())
    assert config["appId"] == "dev.edgelm.demo" and config["webDir"] == "dist"
    assert config["server"]["androidScheme"] == "http"  # the page may then reach a LAN server by http
    gradle = (synced / "android" / "capacitor.settings.gradle").read_text()
    assert "@capacitor/android/capacitor" in gradle


def test_capacitor_is_7_for_node_20():
    lock = json.loads((DEMO / "package-lock.json").read_text())["packages"]
    for name in ("@capacitor/core", "@capacitor/cli", "@capacitor/android"):
        assert lock[f"node_modules/{name}"]["version"].startswith("7."), name
