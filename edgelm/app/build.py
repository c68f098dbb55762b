"""`edgelm app build`: the web app, its runtime files, the artifacts and a router the page can compute, in one folder.

The folder is static: any web server can serve it (`edgelm app serve` adds the headers that enable threads and a
/v1 proxy to the cloud), and Capacitor wraps the same files for Android. ``app.json`` tells the page what it holds:
each model's files with their sha256 (checked in the page before use), its router threshold, the privacy rules.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgelm.app.config import AppBuildConfig
from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

APP_JSON = "app.json"

@dataclass(frozen=True)
class PageRuntime:
    """How the page runs one kind of artifact."""

    name: str  # the page's runtime (app.json's model.runtime)
    vendor: tuple[str, ...]  # folders under the web folder's vendor/ it needs (copied only when used)
    files: tuple[str, ...]  # artifact files the page downloads; the first is the model itself


# artifact kind (its manifest's "kind") -> how the page runs it
PAGE_RUNTIMES: dict[str, PageRuntime] = {
    "export-gguf": PageRuntime("wllama", ("wllama",), ("model.gguf",)),
    "export-onnx": PageRuntime("ort", ("ort", "tokenizers"), ("model.onnx", "model.onnx.data", "genai_config.json",
                                                             "tokenizer.json", "tokenizer_config.json")),
}
CHAT_MARK = "\x00edgelm-message\x00"  # split the rendered chat template around the user's message
# routers the page computes from what its runtimes report (top-n log-probs of greedy tokens), and the baselines
PAGE_ROUTERS = ("confidence-topn", "always-device", "always-cloud")
DEFAULT_ROUTER = "confidence-topn"


@dataclass(frozen=True)
class AppBuild:
    out: Path  # the app folder
    models: list[dict[str, Any]]  # what app.json lists, one per artifact
    total_bytes: int  # the whole folder


def default_web() -> Path:
    """The web app installed with the package (edgelm/app/www of a wheel; android_demo/www of an editable
    checkout, which pyproject maps there)."""
    import importlib.util

    spec = importlib.util.find_spec("edgelm.app.www")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "android_demo" / "www"  # a source tree on sys.path, not installed


def _artifact(path: str) -> tuple[Path, dict[str, Any], str]:
    from edgelm.manifest import read_manifest

    folder = Path(path)
    if not folder.is_dir():
        raise EdgelmError(f"{path} is not an artifact folder; pass what `edgelm export` wrote")
    m = read_manifest(folder)  # refuses a changed or corrupt file
    if m is None:
        raise EdgelmError(f"{path} has no edgelm.json; pass what `edgelm export` wrote")
    kind = m.get("kind", "")
    if kind not in PAGE_RUNTIMES:
        ok = " and ".join(k.removeprefix("export-") for k in PAGE_RUNTIMES)
        raise EdgelmError(f"{path} is a {kind!r} artifact; the app runs {ok} artifacts (edgelm export --target "
                          "gguf or onnx)")
    return folder, m, PAGE_RUNTIMES[kind]


def _check_web(web: Path, vendor: set[str]) -> None:
    if not (web / "index.html").is_file():
        raise EdgelmError(f"{web} has no index.html; pass --web with the app's folder (android_demo/www of a checkout)")
    missing = [v for v in sorted(vendor) if not any((web / "vendor" / v).glob("*"))]
    if missing:
        fix = ("run `make app-deps` (npm ci in android_demo) first" if (web.parent / "package.json").is_file() else
               "this install was built without them: pass --web with a checkout's android_demo/www after "
               "`make app-deps`, or install a wheel built after it")
        raise EdgelmError(f"{web / 'vendor' / missing[0]} is missing: the runtime files are copied from npm packages; "
                          f"{fix}")


def _chat(folder: Path) -> dict[str, str] | None:
    """The model's chat template around one user message, as the text before and after it (the page adds the
    message between, so it renders chats exactly as Python does); None without a template."""
    from edgelm.runtimes.text import TextTokenizer

    tok = TextTokenizer.from_folder(folder)
    if not tok.chat_template:
        return None
    text = tok.apply_chat_template([{"role": "user", "content": CHAT_MARK}])
    if text.count(CHAT_MARK) != 1:
        return None  # a template that transforms the message: not expressible as prefix + message + suffix
    prefix, suffix = text.split(CHAT_MARK)
    return {"prefix": prefix, "suffix": suffix}


def _route(state) -> dict[str, Any]:
    """What the page needs of a router state; infinite thresholds (always-*, budgets 0 and 1) become +-1e300, since
    JSON has no infinity."""
    t = max(min(state.threshold, 1e300), -1e300)
    return {"router": state.router, "threshold": t, "params": state.params, "budget": state.budget,
            "calibration": state.calibration}


def _router_for(c: AppBuildConfig, folder: Path, queries: list[str]) -> dict[str, Any]:
    """The router state the page uses for this model: the given file's, or confidence-topn calibrated on it."""
    from edgelm.coop.routers import RouterState, calibrate, router_from_state
    from edgelm.registry import ROUTERS
    from edgelm.runtimes.api import load

    if c.router:
        state = RouterState.load(c.router)
        if state.router not in PAGE_ROUTERS:
            raise EdgelmError(f"{c.router} holds router {state.router!r}, which the page cannot compute; it runs "
                              f"{', '.join(PAGE_ROUTERS)} (omit --router to calibrate {DEFAULT_ROUTER})")
        router_from_state(state)  # refuses bad parameters here, not in the page
        return _route(state)
    router = ROUTERS.get(DEFAULT_ROUTER).from_state({})
    with load(folder, threads=None) as rt:
        state = calibrate(router, rt, [rt.encode(q) for q in queries], c.cloud_budget)
    log.info("%s: %s threshold %.4g sends %.0f%% of %d val-split queries to the cloud", folder.name, state.router,
             state.threshold, 100 * state.calibration.get("achieved_share", 0), len(queries))
    return _route(state)


def build_app(config: AppBuildConfig | None = None, **kwargs: Any) -> AppBuild:
    """Write the app folder. Keyword arguments are :class:`AppBuildConfig` fields."""
    from edgelm.coop.data import function_queries
    from edgelm.coop.privacy import PrivacyGuard, detector_table
    from edgelm.coop.routers import check_budget
    from edgelm.fsutil import atomic_dir, atomic_write_json
    from edgelm.manifest import write_manifest

    c = replace(config or AppBuildConfig(), **kwargs)
    if not c.artifacts or not c.out:
        raise EdgelmError("app build needs at least one artifact folder and --out")
    check_budget(c.cloud_budget)
    arts = [_artifact(a) for a in c.artifacts]
    names = [f.name for f, _, _ in arts]
    if len(set(names)) != len(names):
        raise EdgelmError(f"two artifacts share the folder name {max(names, key=names.count)!r}; the app names "
                          "models by folder, so rename one")
    web = Path(c.web) if c.web else default_web()
    vendor = {v for _, _, rt in arts for v in rt.vendor}
    _check_web(web, vendor)
    queries = [] if c.router else [q.prompt for q in function_queries(c.data, "val", c.calib_queries)]
    if not c.router and not queries:
        raise EdgelmError("no calibration queries in the corpus's val split; pass --data with Python source, or "
                          "--router")
    models = []
    unused = {p.name for p in (web / "vendor").glob("*")} - vendor if (web / "vendor").is_dir() else set()
    with atomic_dir(c.out, overwrite=c.force) as tmp:
        shutil.copytree(web, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "*.map", *unused))
        shell = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        for folder, m, rt in arts:
            dest = tmp / "models" / folder.name
            shutil.copytree(folder, dest)
            files = [{"name": f, "path": f"models/{folder.name}/{f}", "bytes": m["files"][f]["size"],
                      "sha256": m["files"][f]["sha256"]} for f in rt.files if f in m["files"]]
            models.append({
                "name": folder.name, "runtime": rt.name, "target": m.get("target"),
                "preset": m.get("preset", {}).get("name"), "file": files[0]["name"], "files": files,
                "bytes": sum(f["bytes"] for f in files), "chat": _chat(folder),
                "route": _router_for(c, folder, queries),
            })
        guard = PrivacyGuard()
        atomic_write_json(tmp / APP_JSON, {"models": models, "default_model": models[0]["name"], "shell": shell,
                                           "privacy": detector_table(guard.detectors)})
        manifest = write_manifest(tmp, "app", models=[m["name"] for m in models])
    log.info("app: %s (%d model(s), %.1f MiB)", c.out, len(models), manifest["total_bytes"] / 2**20)
    return AppBuild(Path(c.out), models, manifest["total_bytes"])
