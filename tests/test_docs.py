"""The user's documentation: it names features, not work items; it lists what each architecture supports; its
layout section matches the tree; the package metadata is current."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "android_demo" / "README.md"]


def test_docs_name_features_not_work_items():
    for path in DOCS:
        hits = re.findall(r"(?i)\bissues? \d+", path.read_text(encoding="utf-8"))
        assert not hits, f"{path.name}: {hits}"


def test_readme_lists_every_architecture_on_every_target():
    from edgelm.registry import ARCHS, TARGETS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Architectures"):]
    header = next(line for line in table.splitlines() if line.startswith("| arch |"))
    for target in TARGETS.names():
        assert target in header.lower(), target
    for arch in ARCHS.names():
        assert re.search(rf"^\| `{arch}` \|", table, re.M), arch


def test_readme_layout_matches_the_tree():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    block = layout[layout.index("```") + 3: layout.index("```", layout.index("```") + 3)]
    named = set(re.findall(r"([a-z_]+/|[a-z_]+\.py)", block))
    for folder in ("edgelm", "converters", "runtimes", "benchmarks", "tests", "android_demo"):
        assert f"{folder}/" in named, folder
    for sub in sorted(p for p in (ROOT / "edgelm").iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert f"{sub.name}/" in named, f"edgelm/{sub.name}/ is missing from the README's layout"
    for f in sorted((ROOT / "edgelm").glob("*.py")):
        if f.name not in ("__init__.py", "__main__.py"):
            assert f.name in named, f"edgelm/{f.name} is missing from the README's layout"
    for name in named:
        if name.endswith(".py") and name != "__init__.py":
            assert list(ROOT.rglob(name)), f"the README's layout names {name}, which does not exist"


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
