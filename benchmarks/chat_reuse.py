"""KV-cache reuse across chat turns: time to first token on the fifth turn of a fixed conversation, per runtime.

    python benchmarks/chat_reuse.py          # exports the real teacher to GGUF, ONNX and TVM once (a few minutes)

The conversation (a system prompt and five user turns about Python code) is played once with greedy replies of
``--reply`` tokens, so every runtime sees its own fixed history. Each round then, per runtime and in alternating
order: turn 5 with reuse (the cache holds turn 4's prompt and reply, as `edgelm chat` leaves it; only the new turn
is prefilled) and turn 5 without (the whole prompt prefilled, keep_cache off). Medians over ``--rounds``. The table
goes into docs/results.md (section "chat-reuse").
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.bench.api import machine_info
from edgelm.report import md_table, update_section
from edgelm.runtimes.api import load
from edgelm.runtimes.chat import ChatSession
from edgelm.runtimes.sampling import GenerationConfig

TEACHER = "smollm2-135m-instruct"
SYSTEM = "You are a concise assistant for Python programmers."
TURNS = (
    "Write a function that returns the n-th Fibonacci number.",
    "Now make it iterative instead of recursive.",
    "Add type hints and a docstring.",
    "How would I test it with pytest?",
    "What is its time complexity?",
)
TARGETS = {"torch": None, "llamacpp": "gguf", "onnx": "onnx", "tvm": "tvm"}  # runtime -> export target


def artifact(runtime: str, out: Path) -> str:
    """The teacher as ``runtime`` opens it: the HF folder for torch, an fp32 export for the others (made once)."""
    target = TARGETS[runtime]
    if target is None:
        return TEACHER
    folder = out / f"teacher-{target}"
    if not (folder / "edgelm.json").is_file():
        subprocess.run([sys.executable, "-m", "edgelm", "export", TEACHER, "--quant", "fp32", "--target", target,
                        "--out", str(folder), "--force", "--no-check"], check=True)
    return str(folder)


def history(chat: ChatSession) -> list[dict[str, str]]:
    """Play turns 1-4 once (greedy) and return their messages."""
    for user in TURNS[:-1]:
        "".join(chat.send(user))
    return list(chat.history)


def fifth_turn(chat: ChatSession, hist: list[dict[str, str]], reuse: bool) -> tuple[float, int, int]:
    """(TTFT s, prompt tokens, cached tokens) of turn 5, the cache (with reuse) holding turn 4 as a chat leaves it."""
    rt = chat.runtime
    rt.keep_cache = reuse
    rt.drop_cache()
    if reuse:  # turn 4 again, from a cold cache: afterwards the cache holds its prompt and reply
        chat.history = list(hist[:-2])
        "".join(chat.send(TURNS[-2]))
        assert chat.history == hist, "the greedy reply to turn 4 changed between runs"
    chat.history = list(hist)
    s = chat.send(TURNS[-1])
    "".join(s)
    g = s.turn.generation
    return g.ttft_s, g.prompt_tokens, g.cached_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtimes", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reply", type=int, default=48, help="tokens per reply (fixed: min = max)")
    p.add_argument("--out", default=str(ROOT / "runs/chat-reuse"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=a.reply, min_new_tokens=a.reply)
    chats, hists = {}, {}
    for name in a.runtimes:
        rt = load(artifact(name, out), runtime=name, threads=a.threads, keep_cache=True)
        chats[name] = ChatSession(rt, system=SYSTEM, config=cfg)
        hists[name] = history(chats[name])
    ttft: dict[tuple[str, bool], list[float]] = {(n, r): [] for n in a.runtimes for r in (True, False)}
    tokens: dict[tuple[str, bool], tuple[int, int]] = {}
    for i in range(a.rounds):
        for name in (a.runtimes if i % 2 == 0 else a.runtimes[::-1]):
            for reuse in ((True, False) if i % 2 == 0 else (False, True)):
                s, n, c = fifth_turn(chats[name], hists[name], reuse)
                ttft[name, reuse].append(s)
                tokens[name, reuse] = (n, c)
        logging.info("round %d/%d done", i + 1, a.rounds)
    wall = time.perf_counter() - t0
    rows, lines = [], []
    for name in a.runtimes:
        on, off = statistics.median(ttft[name, True]), statistics.median(ttft[name, False])
        n, c = tokens[name, True]
        rows.append([name, Path(chats[name].runtime.path).name, n, c, n - c, f"{off * 1e3:.1f}", f"{on * 1e3:.1f}",
                     f"{off / on:.1f}×"])
        assert tokens[name, False][1] == 0
        lines.append(f"- {name}: {off * 1e3:.0f} → {on * 1e3:.0f} ms ({off / on:.1f}× faster first token), "
                     f"{n - c} of {n} prompt tokens prefilled.")
    h = machine_info()
    cmd = "python " + shlex.join(["benchmarks/chat_reuse.py", *sys.argv[1:]])
    body = f"""## Chat: the KV cache kept across turns

`{cmd}` on {h['cpu']}, {a.threads} threads, {wall / 60:.1f} min. The real teacher ({TEACHER}, fp32 in every
format), a system prompt and five user turns about a Fibonacci function, greedy replies of {a.reply} tokens. Time to
first token of turn 5, median of {a.rounds} rounds, with reuse (the cache holds turn 4's prompt and reply as
`edgelm chat` leaves it, so only the new turn is prefilled) and without (keep_cache off: the whole prompt). The
cached count is the longest common prefix of the new prompt with what the cache holds; the reply's tokens count
where they re-encode the same in the rendered history.

{md_table(["runtime", "model", "prompt tokens", "cached", "prefilled", "TTFT without reuse ms", "TTFT with reuse ms", "speed-up"], rows)}
{chr(10).join(lines)}
"""
    update_section(Path(a.docs) / "results.md", "chat-reuse", body)
    print(body)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
