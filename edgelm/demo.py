"""`edgelm demo`: the main job on the embedded default. Prunes SmolLM2-135M-Instruct into a student, distills it
on the stdlib's source, evaluates both on the test split, quantizes and exports the student to GGUF and ONNX (each
artifact checked against PyTorch), and writes a report with tables and plots.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # run folder; the report is out/report.md
    teacher: str = "smollm2-135m-instruct"  # any teacher `edgelm distill` accepts
    layers: int = 16  # decoder blocks kept of the teacher's 30, by block importance
    intermediate_size: int = 1024  # MLP width kept of the teacher's 1536 (multiple of 256)
    minutes: float = 7.0  # training time: the token budget is sized from the speed of the first steps (0: off)
    max_tokens: int = 0  # most tokens to train (0: as many as --minutes allow; 7 min ~ 100k tokens on 2 CPU cores)
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 4  # sequences per step
    lr: float = 5e-4  # peak learning rate
    eval_every: int = 25  # steps between val evaluations
    test_seqs: int = 64  # test-split sequences for the final comparison (one per file first)
    chat_mix: float = 0.2  # share of training sequences from the teacher's chat answers (keeps its chat)
    chat_examples: int = 256  # train-split instructions the teacher answers for the mix (cached after the first run)
    chat_instructions: int = 100  # test-split "write a function" instructions both answer in the report (0 skips)
    chat_max_new_tokens: int = 192  # longest answer, in tokens
    threads: int | None = None  # CPU threads (default: torch's)
    resume: bool = False  # continue an interrupted demo (training, then keep artifacts already exported and checked)
    export: bool = True  # quantize and export the student (--no-export stops after distillation)
    quant: str = "gptq-int4-g32"  # preset of the deployable artifacts (GGUF Q4_0 and ONNX MatMulNBits)
    app_quant: str = "gptq-int4-g32-all"  # preset of the app's default GGUF: a 4-bit lm_head decodes fastest in a page
    calib_samples: int = 64  # GPTQ calibration sequences from the train split
    calib_seqlen: int = 512  # tokens per calibration sequence
    check_seqs: int = 16  # val sequences (of seq_len tokens) in each artifact's quality check
    # QAT of the app's artifact from its GPTQ codes, self-distilled (edgelm qat), timed like --minutes (0 skips)
    qat_minutes: float = 2.0
    bench: bool = True  # benchmark every artifact and the PyTorch student, each in its own process (--no-bench skips)
    bench_repeat: int = 3  # measured runs per bench row
    route: bool = True  # serve the teacher as a local cloud and judge the routers (--no-route skips)
    route_train_queries: int = 200  # train-split functions the learned router is fitted on
    route_eval_queries: int = 100  # test-split functions the routers are judged on
    app: bool = True  # build the mobile app from the GGUF artifacts into out/app (--no-app skips)
    progress: bool = True  # progress bars


@dataclass
class DemoResult:
    student: Path  # the distilled student's HF folder
    report: Path  # report.md with tables and plots
    test: dict[str, Any]  # "teacher" / "student" -> EvalResult on the test split
    artifacts: list[Any] = field(default_factory=list)  # ArtifactRow per exported artifact
    bench: Any = None  # BenchResult, when benchmarked
    routing: Any = None  # RouteEvalResult, or a StepSkipped with the reason
    chat: Any = None  # ChatEval of teacher and student, when measured
    app: Any = None  # AppBuild, or a StepSkipped with the reason


@dataclass
class StepSkipped:
    error: str  # why a step (routing, the app) has no figures


def run_demo(cfg: DemoConfig) -> DemoResult:
    from edgelm.distill.api import distill, evaluate
    from edgelm.distill.config import DistillConfig
    from edgelm.artifact.suite import export_suite
    from edgelm.quant.presets import get_preset
    from edgelm.report import write_distill_report

    for name in filter(None, (cfg.quant, cfg.app_quant)):  # an unknown preset fails now, not after the training
        get_preset(name)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    budget = " and ".join(filter(None, (f"{cfg.minutes:g} min" if cfg.minutes else "",
                                        f"{cfg.max_tokens:,} tokens" if cfg.max_tokens else "")))
    if cfg.qat_minutes < 0:
        from edgelm.errors import EdgelmError

        raise EdgelmError(f"--qat-minutes must be at least 0 (0 skips QAT), got {cfg.qat_minutes:g}")
    log.info("[1/6] distill: %s -> %d layers, MLP %d, %s", cfg.teacher, cfg.layers, cfg.intermediate_size,
             f"at most {budget}" if budget else "no budget")
    dcfg = DistillConfig(
        teacher=cfg.teacher, layers=cfg.layers, intermediate_size=cfg.intermediate_size,
        max_tokens=cfg.max_tokens or None, max_minutes=cfg.minutes,
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=cfg.eval_every, ckpt_every=cfg.eval_every * 2,
        out=str(out), threads=cfg.threads, resume=cfg.resume, force=not cfg.resume, progress=cfg.progress,
        chat_mix=cfg.chat_mix, chat_examples=cfg.chat_examples, chat_max_new_tokens=cfg.chat_max_new_tokens,
    )
    res = distill(dcfg)
    log.info("[2/6] evaluate teacher and student on the test split (%d x %d tokens)", cfg.test_seqs, cfg.seq_len)
    test = {
        name: evaluate(model, split="test", seq_len=cfg.seq_len, max_seqs=cfg.test_seqs, batch_size=cfg.batch_size,
                       threads=cfg.threads)
        for name, model in (("teacher", cfg.teacher), ("student", str(res.student_dir)))
    }
    chat = None
    if cfg.chat_instructions:
        from edgelm.distill.chat import chat_eval

        log.info("[2/6] chat: teacher and student answer %d test-split instructions", cfg.chat_instructions)
        chat = chat_eval({"student": res.student_dir}, teacher=cfg.teacher, n=cfg.chat_instructions,
                         max_new_tokens=cfg.chat_max_new_tokens, threads=cfg.threads, progress=cfg.progress)
    rows = []
    if cfg.export:
        plan = demo_plan(cfg.quant, cfg.app_quant)
        log.info("[3/6] quantize (%s) and export the student: %d artifacts, each checked against PyTorch", cfg.quant,
                 len(plan))
        rows = export_suite(str(res.student_dir), plan, out / "export", calib_samples=cfg.calib_samples,
                            calib_seqlen=cfg.calib_seqlen, eval_seqs=cfg.check_seqs, eval_seqlen=cfg.seq_len,
                            label="student", reuse=cfg.resume)
        if cfg.qat_minutes:
            rows += qat_step(cfg, out, res.student_dir)
    bench = None
    if rows and cfg.bench:
        bench = bench_artifacts(cfg, out, res.student_dir, rows)
    routing = None
    if rows and cfg.route:
        routing = route_step(cfg, out, rows)
    app = app_step(cfg, out, rows) if rows and cfg.app else None
    log.info("[6/6] report")
    report = write_distill_report(out, res, test, wall_s=time.perf_counter() - t0)
    if chat is not None:
        write_chat_section(report, chat, out, res.manifest.get("training", {}))
    if rows:
        write_export_section(report, rows, out)
    if bench is not None:
        write_bench_section(report, bench, out)
    if routing is not None:
        write_routing_section(report, routing, out)
    if app is not None:
        write_app_section(report, app)
    return DemoResult(res.student_dir, report, test, rows, bench, routing, chat, app)


USABLE_TOKENS = 10_000_000  # below this a demo's student is a pipeline demonstration (docs/results.md: 60M made one)


def what_it_bought(chat, training: dict) -> str:
    """One paragraph: the training budget, the student's chat against the teacher's, and plainly whether the student
    is an assistant or a demonstration, with what makes one."""
    tokens, s, t = training.get("tokens_seen", 0), chat.scores["student"], chat.scores["teacher"]
    sized = training.get("time_budget") or {}
    how = (f"{sized['minutes']:g} minutes at {sized['tok_s']:,.0f} tok/s measured in the first steps"
           if sized else "a fixed token budget")
    text = (f"**What this run bought.** {tokens:,} training tokens on {training.get('device', '?')} ({how}). The "
            f"student's verified chat score is {s.verified:.2f} against the teacher's {t.verified:.2f}; "
            f"{100 * s.defines_function:.0f}% of its answers define a function that parses (the teacher's "
            f"{100 * t.defines_function:.0f}%), and {100 * s.finished:.0f}% end within the limit "
            f"({100 * t.finished:.0f}%).")
    if tokens < USABLE_TOKENS:
        text += (" At this budget the student is a demonstration of the pipeline, not a usable assistant. The one "
                 "that beat the teacher's Q4_0 and kept its chat took 60M tokens in 7 minutes on one H200 "
                 "(docs/results.md, `distill_scale_gpu`): on a CUDA machine, `edgelm demo --minutes 7 --batch-size "
                 "256` sizes a budget of that order, or distill it directly with `edgelm distill --device cuda "
                 "--batch-size 256 --kd-chunk 8192 --lr 1e-3 --max-tokens 60000000`.")
    return text + "\n"


def write_chat_section(report: Path, chat, out: Path, training: dict | None = None) -> None:
    """The chat measure and three answers side by side, appended to the report (figures also in chat.json)."""
    import json

    from edgelm.fsutil import atomic_write_text
    from edgelm.report import chat_side_by_side, chat_table

    atomic_write_text(out / "chat.json", json.dumps(chat.as_dict(answers=True), indent=1))
    with open(report, "a", encoding="utf-8") as f:
        f.write(f"""
## Chat: does the student keep the teacher's?

Greedy answers (PyTorch, at most {chat.max_new_tokens} tokens) to {len(chat.instructions)} "write a function"
instructions made from test-split files. The verified score checks each answer by itself: its code must parse, then
it counts whether the code defines the asked name with the asked parameters, ended before the limit, holds no
repetition loop, and passes the source docstring's doctest examples where there are some (run in a child process
with no network; `edgelm.metrics.AnswerCheck` has the weights). The other columns compare it with the teacher's.

{chat_table(chat)}
{what_it_bought(chat, training or {}) if "student" in chat.scores else ""}
{chat_side_by_side(chat, 3)}""")


def demo_plan(quant: str, app_quant: str = "") -> list[tuple[str, str]]:
    """The artifacts `edgelm demo` exports: fp32 references, the chosen preset (GGUF, ONNX and a TVM library), a
    mixed-precision plan, the app's GGUF, and llama.cpp's own 4-bit types."""
    plan = [("fp32", "gguf"), ("fp32", "onnx"), (quant, "gguf"), (quant, "onnx"), (quant, "tvm"),
            ("gptq-mixed", "gguf"), ("gptq-mixed", "onnx"), (app_quant, "gguf"), ("llamacpp-q4_0", "gguf"),
            ("llamacpp-q4_k_m", "gguf")]
    return list(dict.fromkeys(p for p in plan if p[0]))  # --app-quant "" or a preset already listed: once


QAT_PREFIX = "qat-"  # the QAT artifact's folders beside the GPTQ ones: export/qat-gguf-PRESET


def qat_step(cfg: DemoConfig, out: Path, student: Path) -> list:
    """`edgelm qat` of the student onto the app preset's grid, from the GPTQ checkpoint the export step made
    (self-distillation, --qat-minutes), exported to GGUF with its exact check. A failure is a row, not fatal."""
    import shutil

    from edgelm.artifact.suite import ArtifactRow, export_suite
    from edgelm.distill.trainer import checkpoints
    from edgelm.errors import EdgelmError
    from edgelm.qat.api import qat

    preset = cfg.app_quant or cfg.quant
    start = out / "export" / f"quantized-{preset}"
    label = "student QAT"
    run = out / "qat"
    try:
        if not (start / "edgelm.json").is_file():
            raise EdgelmError(f"no checked {preset} checkpoint of the student to start from")
        log.info("[3/6] qat: %s from its GPTQ codes, %g min", preset, cfg.qat_minutes)
        resume = cfg.resume and bool(checkpoints(run) or (run / "quantized").is_dir())
        res = qat(model=str(student), start=str(start), quant=preset, max_minutes=cfg.qat_minutes,
                  max_tokens=cfg.max_tokens or None, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                  eval_every=cfg.eval_every, ckpt_every=cfg.eval_every * 2, out=str(run), threads=cfg.threads,
                  resume=resume, force=not resume, progress=cfg.progress)
        folder = out / "export" / f"quantized-{QAT_PREFIX}{preset}"
        if not resume or not folder.is_dir():  # a new QAT checkpoint: its artifacts are made again
            for old in (folder, out / "export" / f"{QAT_PREFIX}gguf-{preset}"):
                shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(res.student_dir, folder)
    except EdgelmError as e:
        log.warning("QAT step failed: %s", e)
        nan = float("nan")
        return [ArtifactRow(label, preset, "gguf", "", nan, nan, nan, nan, nan, nan, 0, 0.0, error=str(e))]
    return export_suite(str(student), [(preset, "gguf")], out / "export", calib_samples=cfg.calib_samples,
                        calib_seqlen=cfg.calib_seqlen, eval_seqs=cfg.check_seqs, eval_seqlen=cfg.seq_len,
                        label=label, reuse=True, prefix=QAT_PREFIX)


def write_export_section(report: Path, rows, out: Path) -> None:
    from edgelm.report import plot_quant, quant_table, update_section

    plot = plot_quant(rows, out / "quant.png")
    fallbacks = [r for r in rows if r.fallbacks]
    note = ""
    if fallbacks:
        note = (f"\nllama.cpp fell back to other types on {', '.join(f'{r.fallbacks} tensors of {r.preset}' for r in fallbacks)}"
                " (the student keeps the teacher's hidden size 576, not a multiple of K-quants' 256); "
                "each artifact's edgelm.json lists them.\n")
    qat = next((r for r in rows if "QAT" in r.model), None)
    if qat is not None:
        note += (f"\n`{qat.model}`: the {qat.preset} checkpoint after `edgelm qat` (the student self-distilled on that "
                 "grid from its GPTQ codes; `qat/quantized/edgelm.json` holds the run), packed exactly like GPTQ's.\n")
    body = f"""## Deployable artifacts

Each artifact was checked against the fp32 PyTorch student in its own runtime (llama.cpp for GGUF, ONNX Runtime
for ONNX) on the val split; fp32 artifacts also had to match PyTorch's greedy tokens. Folders: `{out / 'export'}`.

{quant_table(rows)}
{note}
![ΔPPL vs size]({plot.name})
"""
    update_section(report, "export", body)


def bench_artifacts(cfg: DemoConfig, out: Path, student: Path, rows):
    """`edgelm bench` of every exported artifact and the PyTorch student (runtime defaults, one process per row)."""
    from edgelm.bench.api import bench
    from edgelm.bench.config import BenchConfig

    models = (str(student), *(r.path for r in rows if not r.error))
    log.info("[4/6] bench: %d models, prompt 128, gen 64, %d runs each", len(models), cfg.bench_repeat)
    return bench(BenchConfig(models=models, repeat=cfg.bench_repeat, json=str(out / "bench.json"),
                             plot=str(out / "bench.png"), progress=cfg.progress))


def write_bench_section(report: Path, result, out: Path) -> None:
    from edgelm.report import update_section

    h = result.header
    libs = ", ".join(f"{k} {v}" for k, v in h["libraries"].items())
    body = f"""## Runtimes side by side (`edgelm bench`)

{h['cpu']}, {h['physical_cores']} physical cores; each row ran in its own process with its runtime's default thread
count; prompt {h['config']['prompt_len']} tokens, {h['config']['gen_len']} generated, mean ± std of
{h['config']['repeat']} runs after a warm-up. {libs}. JSON: `{out / 'bench.json'}`.

{result.table()}
![decode tok/s vs size](bench.png)
"""
    update_section(report, "bench", body)


def route_step(cfg: DemoConfig, out: Path, rows):
    """The teacher behind llama-cpp-python's OpenAI server as the cloud, the student's quantized GGUF as the device:
    train the learned router, judge every router. A failure is reported, not fatal."""
    from edgelm.coop.api import route_eval, route_train
    from edgelm.coop.localcloud import LocalCloud
    from edgelm.errors import EdgelmError
    from edgelm.models.loader import resolve

    ggufs = [r for r in rows if not r.error and r.target == "gguf"]  # the chosen preset first, else any checked GGUF
    device = next((r.path for r in sorted(ggufs, key=lambda r: r.preset != cfg.quant)), None)
    gguf = resolve(cfg.teacher).info.get("gguf")
    if device is None or gguf is None:
        return StepSkipped("needs a GGUF of the student and a built-in (GGUF) teacher")
    log.info("[5/6] route: %s as the device, the teacher as a local cloud; %d + %d queries", Path(device).name,
             cfg.route_train_queries, cfg.route_eval_queries)
    folder = out / "route"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with LocalCloud(gguf, folder / "cloud.log") as cloud:
            common = dict(device=device, cloud_url=cloud.url, threads=1, progress=cfg.progress)
            route_train(queries=cfg.route_train_queries, out=str(folder / "learned.json"), force=True, **common)
            return route_eval(queries=cfg.route_eval_queries, router_file=str(folder / "learned.json"),
                              out=str(folder / "eval"), **common)
    except EdgelmError as e:
        log.warning("routing step failed: %s", e)
        return StepSkipped(str(e))


def app_step(cfg: DemoConfig, out: Path, rows):
    """The mobile app from the checked GGUF artifacts (the app's preset first, then the chosen one, then the
    smallest) and the ONNX ones of the chosen preset and the mixed-precision plan. A failure is reported, not fatal."""
    from edgelm.app.build import build_app
    from edgelm.errors import EdgelmError

    ok = [r for r in rows if not r.error]
    ggufs = [r.path for r in sorted((r for r in ok if r.target == "gguf"),  # the QAT codes before GPTQ's
                                    key=lambda r: (r.preset != cfg.app_quant, "QAT" not in r.model,
                                                   r.preset != cfg.quant, r.model_mib))]
    if not ggufs:
        return StepSkipped("no checked GGUF artifact")
    onnx = [r.path for r in ok if r.target == "onnx" and r.preset in (cfg.quant, "gptq-mixed")]
    log.info("[5/6] app: %d GGUF and %d ONNX artifact(s) into %s", len(ggufs), len(onnx), out / "app")
    try:
        return build_app(artifacts=(*ggufs, *onnx), out=str(out / "app"), force=True)
    except EdgelmError as e:
        log.warning("app step failed: %s", e)
        return StepSkipped(str(e))


def write_app_section(report: Path, app) -> None:
    from edgelm.report import md_table, update_section

    if isinstance(app, StepSkipped):
        body = f"## Mobile app\n\nNot built: {app.error}\n"
    else:
        rows = [[m["name"], m["bytes"] / 2**20, m["route"]["router"], m["route"]["threshold"]] for m in app.models]
        body = f"""## Mobile app

`{app.out}` holds the web app with these models (the first is its default); open it with
`edgelm app serve {app.out} --cloud URL` and a browser at http://127.0.0.1:8090/ (a phone: see android_demo/README.md).

{md_table(["model", "MiB", "auto-mode router", "threshold"], rows)}"""
    update_section(report, "app", body)


def write_routing_section(report: Path, res, out: Path) -> None:
    import shutil

    from edgelm.report import update_section

    if isinstance(res, StepSkipped):
        body = f"## Device and cloud routing\n\nNot measured: {res.error}\n"
    else:
        by = res.by_router()
        if res.gap["judgeable"]:
            figures = (f"{res.verdict} CPT(80%) of the learned router: {100 * by['learned'].cpt80:.0f}% (random "
                       f"{100 * by['random'].cpt80:.0f}%).")
        else:
            figures = res.verdict
        plot = ""
        if res.routers:
            shutil.copy(out / "route" / "eval" / "routing.png", out / "routing.png")
            plot = "![answer quality against cloud share](routing.png)\n"
        body = f"""## Device and cloud routing

Device: the student's quantized GGUF; cloud: the teacher behind llama-cpp-python's OpenAI-compatible server on
127.0.0.1. {res.queries} test-split functions: the prompt is a function's first 2 lines, quality the edit
similarity of the answer's first 3 lines to the rest. Mean quality: device {res.device_quality:.3f}, cloud
{res.cloud_quality:.3f}. {figures} Files: `{out / 'route'}`.

{res.table if res.routers else ""}
{plot}"""
    update_section(report, "routing", body)
