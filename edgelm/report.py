"""Markdown reports with tables and plots, shared by `edgelm demo` and the benchmarks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from edgelm.fsutil import atomic_write_text


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` to a temporary name, then rename: no half-written image is ever at ``path``."""
    plt = _plt()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_curves(series: dict[str, list[dict[str, Any]]], key: str, path: Path, *, ylabel: str,
                hline: tuple[str, float] | None = None, logy: bool = False, event: str = "eval") -> Path:
    """One line per run: ``key`` against tokens seen, from metrics.jsonl records."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, recs in series.items():
        pts = [(r["tokens"], r[key]) for r in recs if r.get("event") == event and key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if event == "eval" else None, markersize=3, label=name)
    if hline:
        ax.axhline(hline[1], color="gray", linestyle="--", label=hline[0])
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_importance(scores: list[float], kept: list[int], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3))
    colors = ["tab:blue" if i in kept else "tab:gray" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("teacher layer (blue = kept)")
    ax.set_ylabel("block influence (1 - cos)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_distill_report(run: Path, res, test: dict[str, Any], *, wall_s: float) -> Path:
    """report.md for a distillation run (used by `edgelm demo`)."""
    run = Path(run)
    m = res.manifest
    recs = read_metrics(res.metrics_path)
    stu = m["student"]
    plots = {
        "val_ppl.png": plot_curves({"student": recs}, "val_ppl", run / "val_ppl.png", ylabel="val perplexity",
                                   hline=("teacher", res.val_teacher.ppl), logy=True),
        "train_loss.png": plot_curves({"student": recs}, "loss", run / "train_loss.png", ylabel="training loss (KD)",
                                      event="train"),
    }
    if "layer_importance" in stu:
        plots["layers.png"] = plot_layer_importance(stu["layer_importance"], stu["kept_layers"], run / "layers.png")
    splits = m["data"]["splits"]
    t, s = test["teacher"].score, test["student"].score
    cfg = m["training"]["config"]
    train_recs = [r for r in recs if r.get("event") == "train"]
    mean_tps = sum(r["tok_s"] for r in train_recs) / max(1, len(train_recs))
    text = f"""# edgelm demo report

Teacher `{m['source']['teacher']}` ({m['source'].get('license', 'license: see source')}) distilled into a pruned
student on `{m['data']['corpus']}`. Total wall time {wall_s / 60:.1f} min.

## Models on the test split ({test['student'].seqs} x {test['student'].seq_len} tokens)

{md_table(["model", "params", "layers", "MLP width", "test ppl", "test top-1", "val ppl"], [
        ["teacher", stu["teacher_params"], len(stu.get("layer_importance", [])) or "-", "-", t.ppl, t.top1,
         res.val_teacher.ppl],
        ["student", stu["params"], stu["layers"], stu["intermediate_size"], s.ppl, s.top1, res.val_student.ppl],
    ])}
## Training

{md_table(["loss", "alpha", "T", "steps", "tokens seen", "seq len", "batch", "peak lr", "mean tok/s"], [[
        cfg["loss"], cfg["alpha"], cfg["temperature"], res.steps, res.tokens_seen, cfg["seq_len"], cfg["batch_size"],
        cfg["lr"], mean_tps]])}
{_budget_line(m["training"])}
![val perplexity](val_ppl.png)

![training loss](train_loss.png)

## Student construction

Layers kept (by block influence, highest kept): `{stu.get('kept_layers')}`; init: {stu['init']}.

{'![layer importance](layers.png)' if 'layers.png' in plots else ''}

## Corpus splits (deterministic by file)

{md_table(["split", "documents", "bytes", "tokens"], [[k, v["docs"], v["bytes"], v["tokens"]] for k, v in splits.items()])}
Student folder: `{res.student_dir}` (manifest `edgelm.json`). Metrics: `{res.metrics_path}`.
"""
    out = run / "report.md"
    atomic_write_text(out, text)
    return out


def update_section(path: str | Path, name: str, body: str) -> Path:
    """Replace (or append) the block between <!-- BEGIN name --> and <!-- END name --> in a Markdown file."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# edgelm results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)
    return path


def quant_table(rows) -> str:
    """Markdown table of ArtifactRows: size, bits/weight and quality against fp32."""
    def f(v, spec):
        return "n/a" if v != v else format(v, spec)  # NaN -> n/a

    body = []
    for r in rows:
        if r.error:
            body.append([r.model, r.preset, r.target, "failed", "", "", "", "", "", r.error.replace("|", "")[:90]])
            continue
        body.append([r.model, r.preset, r.target, f(r.model_mib, ".1f"), f(r.bpw, ".2f"), f(r.ppl, ".3f"),
                     f(r.dppl, "+.3f"), f(r.kld, ".4f"), f(r.top1_agree, ".3f"), r.fallbacks or ""])
    return md_table(["model", "preset", "target", "MiB", "bits/w", "val ppl", "ΔPPL", "KLD", "top-1 agree",
                     "fallbacks"], body)


def plot_quant(rows, path: Path) -> Path:
    """ΔPPL against file size, one point per artifact, per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r.model for r in rows):
        pts = [r for r in rows if r.model == model and not r.error and r.preset != "fp32"]
        ax.scatter([r.model_mib for r in pts], [max(r.dppl, 1e-3) for r in pts], label=model)
        for r in pts:
            ax.annotate(f"{r.preset}/{r.target.split()[0]}", (r.model_mib, max(r.dppl, 1e-3)), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("model file size (MiB)")
    ax.set_ylabel("ΔPPL vs fp32 (val, log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bench(rows: list[dict[str, Any]], path: Path) -> Path:
    """Decode tok/s against file size, and against ΔPPL when measured; one marker per runtime, one point per row."""
    plt = _plt()
    ok = [r for r in rows if not r.get("error") and r.get("tg_tps_mean")]
    quality = [r for r in ok if r.get("dppl") is not None]
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(11 if quality else 6.4, 4.5), squeeze=False)
    panels = [("size_bytes", "model file size (MiB)", 2**20, ok)]
    if quality:
        panels.append(("dppl", "ΔPPL vs reference (symlog)", 1, quality))
    for ax, (key, label, scale, pts) in zip(axes[0], panels):
        for i, rt in enumerate(dict.fromkeys(r["runtime"] for r in pts)):
            sel = [r for r in pts if r["runtime"] == rt]
            ax.errorbar([r[key] / scale for r in sel], [r["tg_tps_mean"] for r in sel],
                        yerr=[r.get("tg_tps_std") or 0 for r in sel], fmt="osD^v"[i % 5], label=rt, capsize=2)
            for r in sel:
                ax.annotate(f"{r['model']} ×{r.get('threads')}", (r[key] / scale, r["tg_tps_mean"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("decode tok/s")
        if key == "dppl":
            ax.set_xscale("symlog", linthresh=0.01)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_pareto(points: list[dict[str, Any]], path: Path, *, xlabel: str = "model file size (MiB)",
                ylabel: str = "test perplexity") -> Path:
    """One point per {label, group, x, y, front}; each group in its own colour, the Pareto front as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in dict.fromkeys(p["group"] for p in points):
        pts = [p for p in points if p["group"] == group]
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], label=group)
        for p in pts:
            ax.annotate(p["label"], (p["x"], p["y"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    front = sorted((p["x"], p["y"]) for p in points if p["front"])
    if front:
        ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _budget_line(training: dict) -> str:
    """How the step count was chosen: a time budget sized from measured speed, or the token/step budget."""
    b = training.get("time_budget")
    if not b:
        return ""
    cap = ", capped by --max-tokens" if b.get("capped") else ""
    return (f"\nTime budget {b['minutes']:g} min on {training.get('device', '?')}: {b['tok_s']:,.0f} tok/s over steps "
            f"2-{b['measured_steps'] + 1} sized the run at {b['steps']} steps{cap} (evaluations not counted).\n")


def chat_table(ev) -> str:
    """The chat measure (a ChatEval) as a table: one row per model, the teacher first."""
    rows = [[label, f"{s.verified:.3f}", f"{s.tests[0]}/{s.tests[1]}", f"{100 * s.defines_function:.0f}%",
             f"{100 * s.finished:.0f}%", s.edit_similarity, s.answer_ppl] for label, s in ev.scores.items()]
    return md_table(["model", "verified score (0-1)", "doctest examples passed",
                     "answers with a parsing code block that defines a function",
                     f"answers ended within {ev.max_new_tokens} tokens", "edit similarity to the teacher's answer",
                     "ppl of the teacher's answers"], rows)


def chat_side_by_side(ev, k: int = 3, max_chars: int = 700) -> str:
    """The first ``k`` instructions of a ChatEval with each model's answer, in a table of code-free cells."""
    def cell(text: str) -> str:
        text = text if len(text) <= max_chars else text[:max_chars] + " …"
        return "<pre>" + text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "&#124;").replace(
            "\n", "<br>") + "</pre>"

    labels = list(ev.answers)
    rows = [[cell(ev.instructions[i].prompt)] + [cell(ev.answers[lb][i].text) for lb in labels]
            for i in range(min(k, len(ev.instructions)))]
    return md_table(["instruction"] + labels, rows)


def progress(iterable, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar on stderr for a long step (tensors written, blocks run), shown on a terminal only."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
