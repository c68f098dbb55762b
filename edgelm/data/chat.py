"""Chat instructions made from the corpus itself, so an instruct teacher's chat can be distilled with its code.

Every function with a docstring in a split's Python files gives one instruction: "write" (its name, parameters and
docstring summary; the answer should be code) or "explain" (its source; the answer is prose). Instructions come from
the split's own files, so test-split instructions are never trained on.
"""
from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass
from typing import Iterator

from edgelm.data.corpus import Corpus

KINDS = ("write", "explain")
EXPLAIN_SHARE = 0.25  # share of functions asked as "explain" (by a hash of their key) when both kinds are wanted
MAX_EXPLAIN_LINES = 30  # longer functions are only asked as "write"
MIN_SUMMARY_WORDS = 3  # docstrings shorter than this say too little to write the function from
PER_FILE = 2  # instructions taken from each file per pass over a split


@dataclass(frozen=True)
class Instruction:
    key: str  # "<document key>::<qualified function name>": stable across machines, unique in a corpus
    kind: str  # "write" or "explain"
    prompt: str  # the user's message
    reference: str  # the function's source in the corpus (what the code an answer writes is compared with)


def _summary(doc: str) -> str:
    """The docstring's first paragraph on one line."""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    args = ast.unparse(fn.args)
    if method:  # a method is asked for as a function: drop its self/cls
        args = re.sub(r"^(self|cls)(, /)?(, )?", "", args)
    return f"{fn.name}({args})"


def _kind(key: str, kinds: tuple[str, ...], lines: int) -> str:
    if kinds == ("write",) or lines > MAX_EXPLAIN_LINES:
        return "write"
    if kinds == ("explain",):
        return "explain"
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "explain" if u < EXPLAIN_SHARE else "write"


def instructions_from_source(doc_key: str, text: str, kinds: tuple[str, ...] = KINDS) -> list[Instruction]:
    """One instruction per documented function (module level and in classes) of one Python file, in file order.
    Files that don't parse give none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out: list[Instruction] = []

    def visit(body: list[ast.stmt], prefix: str, method: bool) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.", True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                summary = _summary(doc) if doc else ""
                if len(summary.split()) < MIN_SUMMARY_WORDS or node.name.startswith(("__", "test")):
                    continue
                source = ast.get_source_segment(text, node) or ""
                key = f"{doc_key}::{prefix}{node.name}"
                kind = _kind(key, kinds, source.count("\n") + 1)
                if kind not in kinds:
                    continue
                if kind == "write":
                    prompt = f"Write a Python function {_signature(node, method)}. {summary}"
                else:
                    prompt = f"Explain what this Python code does:\n```python\n{source}\n```"
                out.append(Instruction(key, kind, prompt, source))

    visit(tree.body, "", False)
    return out


def iter_instructions(corpus: Corpus, split: str, kinds: tuple[str, ...] = KINDS,
                      per_file: int = PER_FILE) -> Iterator[Instruction]:
    """Instructions of a split spread over files: at most ``per_file`` from each file in split order, then the next
    ``per_file`` of each, ... (a prefix is a fair sample of many files). The first pass reads and parses files
    lazily, only as far as it is taken; later passes reuse what it parsed. Only ``.py`` documents are read."""
    rest: list[list[Instruction]] = []  # files with more than the pass has taken
    for key, text in corpus.documents(split):
        if key.split("#", 1)[0].endswith(".py"):
            found = instructions_from_source(key, text, kinds)
            yield from found[:per_file]
            if len(found) > per_file:
                rest.append(found)
    k = per_file
    while rest:
        for found in rest:
            yield from found[k:k + per_file]
        k += per_file
        rest = [f for f in rest if len(f) > k]


def instructions(corpus: Corpus, split: str, n: int, kinds: tuple[str, ...] = KINDS) -> list[Instruction]:
    """The first ``n`` instructions of a split (fewer if it has fewer documented functions)."""
    out = []
    for ins in iter_instructions(corpus, split, kinds):
        if len(out) == n:
            break
        out.append(ins)
    return out
