"""Queries with known answers from source code: a function's first lines as the prompt, the rest as the reference."""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Query:
    prompt: str  # the function's first ``head`` lines
    reference: str  # the rest of the function
    source: str  # file:line


def function_queries(data: tuple[str, ...] = (), split: str = "test", n: int = 64, *, head: int = 2,
                     min_body: int = 3, max_chars: int = 1500) -> list[Query]:
    """Up to ``n`` queries from top-level and class-level functions of the split's Python files, one per file first."""
    from edgelm.data.corpus import Corpus, CorpusSpec, ReadStats

    corpus = Corpus(CorpusSpec(data))
    per_file: list[list[Query]] = []
    for doc in corpus.docs(split):
        text = corpus._read(doc, ReadStats())
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                body = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).splitlines(keepends=True)
                if len(body) < head + min_body or sum(map(len, body)) > max_chars:
                    continue
                found.append(Query("".join(body[:head]), "".join(body[head:]), f"{doc.key}:{node.lineno}"))
        if found:
            per_file.append(found)
    out: list[Query] = []
    k = 0
    while len(out) < n and any(len(f) > k for f in per_file):
        out += [f[k] for f in per_file if len(f) > k][: n - len(out)]
        k += 1
    return out
