"""The package reads as the pipeline: every import points down it, never up.

Layers, bottom to top (a module may import its own layer and the ones below):
    core (errors, registry, fsutil, manifest, metrics, report) → data → models → distill → quant → qat → finetune →
    converters →
    artifact → runtimes → bench | coop → app → demo → cli
Upward dependencies that are real (the export check runs the artifact in its runtime) go through a registry by name
(``TARGET.runtime`` → ``RUNTIMES``), not through an import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package folder on disk -> installed package name
PACKAGES = {"edgelm": "edgelm", "converters": "edgelm.converters", "runtimes": "edgelm.runtimes"}
LAYERS = [
    ("core", ["edgelm", "edgelm.errors", "edgelm.registry", "edgelm.fsutil", "edgelm.manifest", "edgelm.metrics",
              "edgelm.report", "edgelm.cloud", "edgelm.sandbox", "edgelm.netutil"]),
    ("data", ["edgelm.data"]),
    ("models", ["edgelm.models"]),
    ("distill", ["edgelm.distill"]),
    ("quant", ["edgelm.quant"]),
    ("qat", ["edgelm.qat"]),
    ("finetune", ["edgelm.finetune"]),
    ("converters", ["edgelm.converters"]),
    ("artifact", ["edgelm.artifact"]),
    ("runtimes", ["edgelm.runtimes"]),
    ("bench", ["edgelm.bench"]),
    ("coop", ["edgelm.coop"]),
    ("app", ["edgelm.app"]),
    ("demo", ["edgelm.demo"]),
    ("cli", ["edgelm.cli", "edgelm.__main__"]),
]
SIBLINGS = {frozenset({"bench", "coop"})}  # same height, neither imports the other


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    pkg = PACKAGES[rel.parts[0]]
    parts = [pkg, *rel.parts[1:-1]] + ([] if path.stem == "__init__" else [path.stem])
    return ".".join(parts)


def layer_of(module: str) -> tuple[int, str] | None:
    best = None
    for i, (name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[2]):
                best = (i, name, len(p))
    if best is None or (best[1] == "core" and module != "edgelm" and module.startswith("edgelm.") and
                        not any(module == p or module.startswith(p + ".") for p in LAYERS[0][1][1:])):
        return None
    return best[0], best[1]


def sources() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every edgelm import in the file, at any depth (lazy imports inside functions count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("edgelm"):
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("edgelm")]
    return out


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_pipeline(path):
    here = layer_of(module_name(path))
    bad = []
    for line, target in imports(path):
        # "from edgelm.x import name": name may be a module or an attribute; take the longest known prefix
        there = layer_of(target) or layer_of(target.rsplit(".", 1)[0])
        if there is None:
            continue
        if there[0] > here[0] or (there[0] != here[0] and frozenset({here[1], there[1]}) in SIBLINGS):
            bad.append(f"line {line}: {here[1]} imports {target} ({there[1]})")
        elif there[0] == here[0] and frozenset({here[1], there[1]}) in SIBLINGS and here[1] != there[1]:
            bad.append(f"line {line}: {here[1]} imports its sibling {target}")
    assert not bad, "; ".join(bad)


def test_no_import_path_tricks():
    """Benchmarks and child processes import the installed package: no sys.path edits, no PYTHONPATH set."""
    files = sources() + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = [str(p.relative_to(ROOT)) for p in files
           if "sys.path.insert" in p.read_text(encoding="utf-8") or '"PYTHONPATH"' in p.read_text(encoding="utf-8")]
    assert not bad, bad


def test_every_package_is_in_the_wheel():
    """pyproject lists the packages by hand (converters/ and runtimes/ install under edgelm.): a new folder missing
    from that list imports here (editable install) but not from a wheel, which only the slow wheel test would see."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for p in sources() if p.name == "__init__.py"}
    assert on_disk <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
