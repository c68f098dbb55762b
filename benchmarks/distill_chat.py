"""Keep the teacher's chat: a code-only student against students whose training mixes in the teacher's answers to
instructions made from the train split, at equal tokens (writes the `distill_chat` section of docs/results.md).

    python benchmarks/distill_chat.py [--max-tokens 100000] [--mixes 0.2]
    python benchmarks/distill_chat.py --from-student runs/bench-scale-2m/run/student   # a longer-trained start
    python benchmarks/distill_chat.py --from-student runs/gpu-scale/run/student --out runs/bench-chat-gpu \
        --section distill_chat_gpu                                     # the student distilled on a GPU

Every student is the demo's shape (16 of 30 blocks, MLP 1024), distilled with forward KL. The measure: greedy answers
to 100 "write a function" instructions from test-split files, by the teacher and by each student (PyTorch, fp32):
the share whose first code block parses and defines a function, the edit similarity to the teacher's answer, and
the perplexity of the teacher's answers under each model; beside it, each student's raw-code test perplexity.
Goal: at least 90% of the teacher's parse rate, with raw-code test perplexity within 5% of the code-only student's.
Finished runs are reused; teacher answers are cached. With --from-student, every student instead continues that
(longer-distilled) model for --max-tokens more, code only or mixed, and the section `distill_chat_continued` is
written: it asks whether the students miss the teacher's chat for lack of chat data or for lack of competence.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.distill.api import distill, evaluate
from edgelm.distill.chat import chat_eval
from edgelm.manifest import read_manifest
from edgelm.report import chat_side_by_side, md_table, update_section


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--mixes", default="0.2", help="comma-separated chat shares, one student each (0 is always run)")
    p.add_argument("--chat-examples", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--instructions", type=int, default=100)
    p.add_argument("--test-seqs", type=int, default=64)
    p.add_argument("--from-student", default=None,
                   help="continue this student (an HF folder, e.g. the distill_scale run's) instead of pruning")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: DistillConfig's 5e-4); a continuation may want less")
    p.add_argument("--out", default=None, help="runs/bench-chat, or runs/bench-chat-continued with --from-student")
    p.add_argument("--section", default=None, help="the results.md section to write (default: from the flags)")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    a.out = a.out or ("runs/bench-chat-continued" if a.from_student else "runs/bench-chat")
    # every student's start (a pruned shape or a trained student) and, when given, its peak learning rate
    start = (dict(student=a.from_student) if a.from_student else dict(layers=16, intermediate_size=1024))
    if a.lr is not None:
        start["lr"] = a.lr
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    mixes = [0.0] + [float(m) for m in a.mixes.split(",") if float(m) > 0]
    students, rows = {}, {}
    for mix in mixes:
        label = "student, code only" if mix == 0 else f"student, {100 * mix:.0f}% chat"
        out = Path(a.out) / f"mix-{mix:g}"
        done = (out / "student" / "edgelm.json").exists()  # a finished run with these flags is reused
        logging.info("== %s", label)
        res = distill(teacher=a.teacher, **start, max_tokens=a.max_tokens, eval_every=25,
                      ckpt_every=50, chat_mix=mix, chat_examples=a.chat_examples,
                      chat_max_new_tokens=a.max_new_tokens, out=str(out), resume=done, force=not done)
        test = evaluate(str(res.student_dir), split="test", max_seqs=a.test_seqs)
        students[label] = str(res.student_dir)
        rows[label] = {"test_ppl": test.score.ppl, "test_top1": test.score.top1, "val_ppl": res.val_student.ppl,
                       "wall_min": res.manifest["training"]["wall_s_this_process"] / 60,
                       "answers": res.manifest["training"].get("chat", {}).get("answers", 0)}
    teacher_test = evaluate(a.teacher, split="test", max_seqs=a.test_seqs)
    ev = chat_eval(students, teacher=a.teacher, n=a.instructions, max_new_tokens=a.max_new_tokens, progress=True)
    base = rows["student, code only"]["test_ppl"]
    t_rate = ev.scores["teacher"].defines_function
    t = ev.scores["teacher"]
    table = [["teacher", "-", f"{100 * t_rate:.0f}%", f"{100 * t.finished:.0f}%", "1 (itself)", t.answer_ppl,
              teacher_test.score.ppl, "-", "-", "-"]]
    for label, r in rows.items():
        s = ev.scores[label]
        table.append([label, r["answers"], f"{100 * s.defines_function:.0f}%", f"{100 * s.finished:.0f}%",
                      s.edit_similarity, s.answer_ppl,
                      r["test_ppl"], f"{100 * (r['test_ppl'] / base - 1):+.1f}%",
                      f"{100 * s.defines_function / t_rate:.0f}%" if t_rate else "n/a", r["wall_min"]])
    best = max((lb for lb in rows if lb != "student, code only"), key=lambda lb: ev.scores[lb].defines_function,
               default=None)
    verdict = ""
    if best:
        share = ev.scores[best].defines_function / t_rate if t_rate else 0.0
        cost = rows[best]["test_ppl"] / base - 1
        verdict = (f"Goal (at least 90% of the teacher's parse rate, raw-code test ppl within 5% of code-only): "
                   f"{best} reaches {100 * share:.0f}% of the teacher's rate ({'met' if share >= 0.9 else 'missed'}) "
                   f"at {100 * cost:+.1f}% test ppl ({'met' if cost <= 0.05 else 'missed'}).")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "chat.json").write_text(json.dumps({"rows": rows, "chat": ev.as_dict(answers=True),
                                                       "teacher_test_ppl": teacher_test.score.ppl}, indent=1))
    cmd = "python benchmarks/distill_chat.py " + shlex.join(sys.argv[1:])
    if a.from_student:
        section, title = "distill_chat_continued", "Chat from a longer-distilled student"
        seen = (read_manifest(a.from_student, verify=False) or {}).get("training", {}).get("tokens_seen", 0)
        who = (f"Students: each continues `{a.from_student}` (its manifest: {seen:,} tokens "
               f"distilled) for {a.max_tokens:,} more tokens, forward KL.")
        if a.lr is not None:  # its own section, beside the default-schedule continuation
            section, title = f"{section}_lr", f"{title}, peak learning rate {a.lr:g}"
            who += f" Peak learning rate {a.lr:g} (the default is 5e-4; the start ended its schedule at 5e-5)."
    else:
        section, title = "distill_chat", "Keeping the teacher's chat"
        who = f"Students: 16 of 30 blocks, MLP 1024, {a.max_tokens:,} training tokens each, forward KL."
    if a.section:
        section, title = a.section, f"{title}: `{a.from_student or 'pruned students'}`"
    body = f"""## {title} (`benchmarks/distill_chat.py`)

Command: `{cmd.strip()}` on {platform.machine()}, {(time.perf_counter() - t0) / 60:.0f} min in this invocation
(finished runs are reused and teacher answers cached; the first run generates 256 + 100 teacher answers, about 7 min
here). {who}
The chat students' stream mixes in the teacher's greedy answers (at most {a.max_new_tokens} tokens, in its chat
template) to the first {a.chat_examples} instructions made from train-split files ("write a function" from a
docstring, or "explain this code"); those tokens get logit KD like the rest. Measure: {len(ev.instructions)} "write"
instructions from test-split files, greedy answers in PyTorch fp32.

{md_table(["model", "teacher answers trained on", "answers defining a function (code block parses)",
           f"answers ended within {a.max_new_tokens} tokens", "edit similarity to teacher",
           "ppl of teacher's answers", f"raw-code test ppl ({a.test_seqs} x 256)", "test ppl vs code only",
           "parse rate vs teacher", "training wall (min)"], table)}
{verdict}

Three of the test instructions, answered greedily:

{chat_side_by_side(ev, 3)}"""
    update_section(Path(a.docs) / "results.md", section, body)
    logging.info("wrote %s", Path(a.docs) / "results.md")


if __name__ == "__main__":
    main()
