"""`edgelm` command line: a thin layer over the Python API. Imports nothing heavy until a command runs."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from edgelm import __version__
from edgelm.errors import EdgelmError

log = logging.getLogger("edgelm")
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "gguf", "gguf.gguf_writer", "gguf.vocab", "httpx", "httpcore")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage goes to --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_help(cls: type) -> dict[str, str]:
    """The comment after each dataclass field is its help text."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # subclasses override
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def add_dataclass_args(p: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls``: --name-with-dashes, typed from the annotation."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        default = f.default
        h = helps.get(f.name, "").replace("%", "%%")  # argparse formats help strings with %
        if ann == "bool":
            if default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=h)
            else:
                p.add_argument(flag, action="store_true", help=h)
        elif ann.startswith("tuple"):
            # numbers may be comma-separated too; names and paths may not (a path can hold a comma)
            item: Callable[[str], Any] = _items(int) if ann.startswith("tuple[int") else str
            # an empty default gathers repeats (--adapter a=P --adapter b=Q); a default list is replaced whole
            p.add_argument(flag, nargs="+", type=item, default=list(default), metavar="X", help=h,
                           action="store" if default else "extend")
        else:
            typ: Callable[[str], Any] = int if ann.startswith("int") else float if ann.startswith("float") else str
            shown = "" if default is None or default == "" else f" (default: {default})"  # empty: the help says it
            p.add_argument(flag, type=typ, default=default, help=h + shown)


def _items(conv: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A number list's item type: "1 2", "1,2" and "1, 2" all give [1, 2] (llama-bench spells its sweeps "-t 1,2")."""
    def parse(text: str) -> list[Any]:
        return [conv(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = conv.__name__  # argparse names it in its error: "invalid int value: '1,x'"
    return parse


def _from_args(cls: type, args: argparse.Namespace) -> Any:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for f in dataclasses.fields(cls):
        if str(f.type).startswith("tuple") and kw.get(f.name) is not None:
            kw[f.name] = tuple(x for v in kw[f.name] for x in (v if isinstance(v, list) else [v]))
    return cls(**kw)


# --- commands ---------------------------------------------------------------------------------------------------

def cmd_distill(args: argparse.Namespace) -> int:
    from edgelm.distill.api import distill
    from edgelm.distill.config import DistillConfig

    res = distill(_from_args(DistillConfig, args))
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"student: {res.student_dir}")
    print(f"val perplexity: student {res.val_student.ppl:.3f}, teacher {res.val_teacher.ppl:.3f} "
          f"({res.tokens_seen:,} tokens, {res.steps} steps)")
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    from edgelm.qat.api import qat
    from edgelm.qat.config import QatConfig

    res = qat(_from_args(QatConfig, args))
    if os.environ.get("RANK", "0") != "0":
        return 0
    q = res.manifest.get("quality") or {}
    print(f"quantized: {res.student_dir}")
    print(f"val perplexity: {res.val_student.ppl:.3f} on the grid ({res.tokens_seen:,} tokens, {res.steps} steps)"
          + (f"; against {args.model}: KLD {q['kld']:.4f}, top-1 agreement {q['top1_agree']:.3f}" if q else ""))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from edgelm.finetune.api import finetune
    from edgelm.finetune.config import FinetuneConfig

    res = finetune(_from_args(FinetuneConfig, args))
    if os.environ.get("RANK", "0") != "0":
        return 0
    f = res.manifest.get("finetune") or {}
    what = "model" if args.full else "adapter"
    print(f"{what}: {res.student_dir}")
    before = f.get("val_ppl_before")
    print(f"val perplexity on the new domain: {'?' if before is None else f'{before:.3f}'} -> {res.val_student.ppl:.3f} "
          f"({res.tokens_seen:,} tokens, {res.steps} steps"
          + (f", {f['trainable_params']:,} trainable parameters)" if f else ")"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgelm.distill.api import evaluate

    res = evaluate(args.model, data=tuple(args.data), text_field=args.text_field, split=args.split,
                   seq_len=args.seq_len, max_seqs=args.max_seqs, batch_size=args.batch_size, threads=args.threads)
    chat = None
    if args.chat:
        from edgelm.distill.chat import chat_eval

        chat = chat_eval({"model": args.model}, teacher=args.teacher, data=tuple(args.data), n=args.chat,
                         max_new_tokens=args.chat_max_new_tokens, threads=args.threads)
    if args.json:
        print(json.dumps({**res.as_dict(), **({"chat": chat.as_dict()} if chat else {})}, indent=2))
    else:
        s = res.score
        print(f"{res.model}: {res.split} perplexity {s.ppl:.4f}, top-1 accuracy {s.top1:.4f} "
              f"({s.tokens:,} predicted tokens, {res.seqs} x {res.seq_len})")
        if chat:
            from edgelm.report import chat_table

            print(f"chat, {len(chat.instructions)} test-split instructions against {args.teacher}:")
            print(chat_table(chat), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgelm.demo import DemoConfig, run_demo

    res = run_demo(_from_args(DemoConfig, args))
    print(f"student: {res.student}")
    print(f"report:  {res.report}")
    if getattr(res.app, "out", None):
        print(f"app:     edgelm app serve {res.app.out}   (then open http://127.0.0.1:8090/)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgelm.quant.api import quantize
    from edgelm.quant.config import QuantizeConfig

    res = quantize(_from_args(QuantizeConfig, args))
    q = res.quality
    bpw = res.plan["bits_per_weight"] if res.plan else res.preset.bits_per_weight
    print(f"quantized: {res.out} ({res.preset.name}, {bpw:.2f} bits/weight, {res.seconds:.1f} s)")
    if res.plan:
        print(f"types: {res.plan['summary']}")
    if q:
        print(f"val perplexity {q['ppl']:.4f} (fp32 {q['ppl_ref']:.4f}, +{q['dppl']:.4f}), KLD {q['kld']:.5f}, "
              f"top-1 agreement {q['top1_agree']:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgelm.artifact.api import export
    from edgelm.artifact.config import ExportConfig

    res = export(_from_args(ExportConfig, args))
    m = res.manifest
    if res.preset == "adapter":  # a LoRA adapter for --base's runtime
        par = m.get("parity", {})
        print(f"exported: {res.out} ({res.target} LoRA adapter, {m['total_bytes'] / 2**20:.2f} MiB, "
              f"{100 * (m['share_of_base_bytes'] or 0):.1f}% of the base's bytes)")
        print("check: skipped (--no-check)" if par.get("skipped") else
              f"check: passed; KLD from PyTorch's base + adapter {par['kld']:.5f} (the base's own {par['base_kld']:.5f}"
              f"; the adapter moves PyTorch by {par['adapter_effect_kld']:.4f}), greedy identical "
              f"{par['greedy_identical']}/{par['greedy_prompts']}")
        return 0
    print(f"exported: {res.out} ({res.target}, {res.preset}, {m['total_bytes'] / 2**20:.1f} MiB)")
    if m.get("plan"):
        print(f"types: {m['plan']['summary']}")
    par = m.get("parity", {})
    if par.get("skipped"):
        print("check: skipped (--no-check)")
    else:
        line = (f"check: passed; val ppl {par['ppl']:.4f} (fp32 {par['ppl_ref']:.4f}), KLD {par['kld']:.5f}, "
                f"top-1 agreement {par['top1_agree']:.4f}, max |dlogit| {par['max_abs_logit_diff']:.3g}")
        if "greedy_identical" in par:
            line += f", greedy identical {par['greedy_identical']}/{par['greedy_prompts']}"
        print(line)
    if m.get("fallback_tensors"):
        print(f"warning: llama.cpp fell back on {len(m['fallback_tensors'])} tensors (listed in edgelm.json)")
    print(f"took {m['seconds']:.1f} s, peak memory {m['peak_rss_mib']:,} MiB")
    return 0


def _generation_config(args: argparse.Namespace):
    """The GenerationConfig of `generate` and `chat`'s flags (_add_generation_args), validated."""
    from edgelm.runtimes.sampling import GenerationConfig

    cfg = _from_args(GenerationConfig, args)
    return cfg.with_options(stop_ids=tuple(args.stop_ids) if args.stop_ids else None).validate()


def cmd_generate(args: argparse.Namespace) -> int:
    from edgelm.runtimes.api import load

    cfg = _generation_config(args)
    if args.prompt is None and not args.chat:
        raise EdgelmError("pass a prompt (or --chat MESSAGE)")
    with load(args.model, runtime=args.runtime, threads=args.threads, context=args.context) as rt:
        log.info("%s on %s, %d thread(s), context %d", rt.path, rt.name, rt.threads, rt.context)
        if args.chat:
            s = rt.chat([{"role": "user", "content": args.chat}], cfg, stream=True)
        else:
            s = rt.generate(args.prompt, cfg, stream=True)
        for delta in s:
            if args.stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
        g = s.result
        if not args.stream:
            sys.stdout.write(g.text)
        sys.stdout.write("\n")
        log.info("%d prompt + %d new tokens (%s); TTFT %.1f ms, decode %.1f tok/s", g.prompt_tokens, len(g.ids),
                 g.finish_reason, g.ttft_s * 1e3, g.decode_tokens_per_s)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from edgelm.runtimes.api import load
    from edgelm.runtimes.chat import ChatSession, repl

    cfg = _generation_config(args)
    from edgelm.coop.api import parse_adapters

    adapters = parse_adapters(tuple(f"{a}={a}" if "=" not in a else a for a in args.adapter))
    with load(args.model, runtime=args.runtime, threads=args.threads, context=args.context,
              keep_cache=not args.no_cache, adapters=adapters) as rt:
        if adapters:
            rt.set_adapter(next(iter(adapters)))
        rt.apply_chat_template([{"role": "user", "content": "hi"}])  # no template: say so before the first turn
        return repl(ChatSession(rt, system=args.system, config=cfg), stats=args.stats)


def cmd_bench(args: argparse.Namespace) -> int:
    from edgelm.bench.api import bench
    from edgelm.bench.config import BenchConfig

    cfg = _from_args(BenchConfig, args)
    res = bench(cfg)
    if cfg.dry_run:
        print(f"would run {len(res.rows)} row(s), each in its own process:")
        for r in res.rows:
            what = r.get("error") or f"{r['runtime']}, threads {r['threads'] or 'auto'}"
            print(f"  {r['model']}: {what}")
        return 0
    h = res.header
    where = [f"{h['cpu']} ({h['physical_cores']} cores)"] if cfg.device == "local" else [
        f"{d['id']}: {d.get('cpu') or d.get('user_agent', '?')} ({d.get('logical_cores') or d.get('cores') or '?'} "
        f"cores{', emulated' if d.get('emulated') else ''})" for d in h.get("devices", [])] or [cfg.device]
    print(f"edgelm bench on {'; '.join(where)}; prompt {cfg.prompt_len}, gen {cfg.gen_len}, {cfg.repeat} runs per "
          "row (mean ± std)\n")
    print(res.table())
    for path in (cfg.json, cfg.csv, cfg.plot):
        if path:
            print(f"wrote {path}")
    return 1 if res.rows and all(r.get("error") for r in res.rows) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from edgelm.coop.api import serve
    from edgelm.coop.config import ServeConfig

    serve(_from_args(ServeConfig, args))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from edgelm.coop.api import route_eval, route_train
    from edgelm.coop.config import RouteConfig

    cfg = _from_args(RouteConfig, args)
    if args.route_command == "train":
        st = route_train(cfg)
        cal = st.calibration
        print(f"router: {cfg.out} (learned; threshold {st.threshold:.4g} sends {100 * cal['achieved_share']:.0f}% of "
              f"{cal['queries']} train queries to the cloud; fit correlation {cal['train_corr']:.2f})")
    else:
        res = route_eval(cfg)
        print(f"device quality {res.device_quality:.3f}, cloud quality {res.cloud_quality:.3f}, "
              f"{res.queries} test queries. {res.verdict}\n")
        if res.routers:
            print(res.table)
        print(f"wrote {cfg.out}/routing.md{', routing.png' if res.routers else ''}, routing.json")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from edgelm.app.config import AppBuildConfig, AppServeConfig

    if args.app_command == "build":
        from edgelm.app.build import build_app

        res = build_app(_from_args(AppBuildConfig, args))
        for m in res.models:
            r = m["route"]
            print(f"  {m['name']}: {m['bytes'] / 2**20:.1f} MiB, {m['runtime']}; router {r['router']} threshold "
                  f"{r['threshold']:.4g}")
        print(f"app: {res.out} ({res.total_bytes / 2**20:.1f} MiB); serve it with `edgelm app serve {res.out}`")
    else:
        from edgelm.app.serve import serve_app

        serve_app(_from_args(AppServeConfig, args))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from edgelm.registry import ARCHS, KD_LOSSES, QUANTS, ROUTERS, RUNTIMES, STUDENT_ZOO, TARGETS, TEACHERS

    what = args.what
    if what in ("archs", "all"):
        print("architectures (HF model_type; llama.cpp architecture):")
        for name, a in ARCHS.items():
            print(f"  {name:24s} {a.gguf_arch.lower():10s} {a.description}")
    if what in ("teachers", "all"):
        print("teachers (built-in):")
        for name, t in TEACHERS.items():
            print(f"  {name:24s} {t.description}; {t.license}; {t.pip}")
    if what in ("students", "all"):
        print("students (zoo; or prune the teacher with --layers / --intermediate-size):")
        for name, s in STUDENT_ZOO.items():
            print(f"  {name:24s} {s.description}; {s.params(49152) / 1e6:.1f}M params with SmolLM2's 49,152 vocab")
    if what in ("losses", "all"):
        print("KD losses:")
        for name, fn in KD_LOSSES.items():
            doc = (fn.__doc__ or "").strip().splitlines()[0]
            print(f"  {name:24s} {doc}")
    if what in ("quants", "all"):
        print("quant presets (bits/weight; targets):")
        for name, q in QUANTS.items():
            print(f"  {name:24s} {q.bits_per_weight:5.2f}  {','.join(q.targets):10s} {q.summary}")
    if what in ("targets", "all"):
        print("export targets:")
        for name, t in TARGETS.items():
            doc = (type(t).__doc__ or "").strip().splitlines()[0]
            print(f"  {name:24s} {doc}")
    if what in ("runtimes", "all"):
        print("runtimes (formats; pip extra):")
        for name, r in RUNTIMES.items():
            extra = f"pip install 'edgelm[{r.extra}]'" if r.extra else "included"
            print(f"  {name:24s} {','.join(r.formats):10s} {extra}")
    if what in ("routers", "all"):
        print("routers (edgelm serve --router):")
        for name, r in ROUTERS.items():
            print(f"  {name:24s} {(r.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _command(sub: Any, name: str, help: str, cls: type, func: Callable[[argparse.Namespace], int],
             *positional: tuple[str, dict[str, Any]]) -> argparse.ArgumentParser:
    """A subcommand: its positional arguments, then one flag per other field of ``cls``."""
    p = sub.add_parser(name, help=help)
    for arg, kw in positional:
        p.add_argument(arg, **kw)
    add_dataclass_args(p, cls, skip=tuple(arg for arg, _ in positional))
    p.set_defaults(func=func)
    return p


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The model and how to open it, for the commands that run one (generate, chat)."""
    p.add_argument("model", help="artifact folder, HF folder, .gguf, built-in name or hub id")
    p.add_argument("--runtime", default=None, help="force a runtime (edgelm list runtimes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's pick, logged)")
    p.add_argument("--context", type=int, default=None, help="KV cache tokens (default: the runtime's)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """GenerationConfig's flags, and --stop-ids (read back by _generation_config)."""
    from edgelm.runtimes.sampling import GenerationConfig

    add_dataclass_args(p, GenerationConfig, skip=("stop_ids",))
    p.add_argument("--stop-ids", type=int, nargs="+", default=None, help="stop token ids (default: end-of-sequence)")


def build_parser() -> argparse.ArgumentParser:
    from edgelm.distill.config import DistillConfig

    p = _Parser(prog="edgelm", description="Distill, quantize, export and run small LMs on edge devices.")
    p.add_argument("--version", action="version", version=f"edgelm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("distill", help="train a student from a teacher with logit KD")
    add_dataclass_args(d, DistillConfig)
    d.set_defaults(func=cmd_distill)

    from edgelm.qat.config import STUDENT_FLAGS, QatConfig

    qa = sub.add_parser("qat", help="quantization-aware KD: train a model onto a preset's exact grids, for export")
    qa.add_argument("model", help="the float model: HF folder, built-in name or hub id")
    add_dataclass_args(qa, QatConfig, skip=("model", *STUDENT_FLAGS))
    qa.set_defaults(func=cmd_qat)

    from edgelm.finetune.config import STUDENT_FLAGS as FT_FLAGS, FinetuneConfig

    ft = sub.add_parser("finetune", help="adapt a model to your own data: a LoRA adapter (PEFT), or --full")
    ft.add_argument("model", help="HF folder, built-in name, hub id, or an `edgelm quantize`/`qat` folder")
    add_dataclass_args(ft, FinetuneConfig, skip=("model", *FT_FLAGS))
    ft.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", help="perplexity and top-1 accuracy of a model on a corpus split")
    e.add_argument("model", help="HF folder, .gguf, built-in name or hub id")
    e.add_argument("--data", nargs="+", default=[], help="files, folders, globs, .jsonl (default: the stdlib source)")
    e.add_argument("--text-field", default="text", help="text field of .jsonl records")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="corpus split (default: test)")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    e.add_argument("--max-seqs", type=int, default=64, help="sequences to score (default: 64)")
    e.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default: 4)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    e.add_argument("--chat", type=int, default=0, metavar="N",
                   help="also answer N test-split 'write a function' instructions and score them against --teacher")
    e.add_argument("--teacher", default="smollm2-135m-instruct", help="reference for --chat (default: %(default)s)")
    e.add_argument("--chat-max-new-tokens", type=int, default=192, help="longest answer for --chat (default: 192)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)

    from edgelm.artifact.config import ExportConfig
    from edgelm.quant.config import QuantizeConfig

    _command(sub, "quantize", "quantize with a preset (RTN, GPTQ) into a GPTQ-format checkpoint", QuantizeConfig,
             cmd_quantize, ("model", {"help": "HF folder, .gguf, built-in name or hub id"}))
    _command(sub, "export", "export to GGUF or ONNX (quantizing first if the preset says so), checked against PyTorch",
             ExportConfig, cmd_export,
             ("model", {"help": "HF folder, .gguf, built-in name, hub id, or an `edgelm quantize` folder"}))

    from edgelm.demo import DemoConfig

    m = sub.add_parser("demo", help="the whole pipeline on the embedded teacher, with a report")
    add_dataclass_args(m, DemoConfig)
    m.set_defaults(func=cmd_demo)

    from edgelm.bench.config import BenchConfig

    g = sub.add_parser("generate", help="generate text with any model or artifact, on any runtime (streams to stdout)")
    _add_runtime_args(g)
    g.add_argument("prompt", nargs="?", default=None, help="prompt text")
    g.add_argument("--chat", default=None, metavar="MESSAGE", help="a user message, formatted with the chat template")
    g.add_argument("--no-stream", dest="stream", action="store_false", help="print the text at the end")
    _add_generation_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="an interactive multi-turn chat with any model or artifact, on any runtime")
    _add_runtime_args(c)
    c.add_argument("--system", default="", help="system prompt (also /system TEXT in the chat)")
    c.add_argument("--no-cache", action="store_true", help="prefill the whole conversation every turn (no KV reuse)")
    c.add_argument("--stats", action="store_true", help="after each reply: tokens, cached tokens, TTFT and tok/s")
    c.add_argument("--adapter", action="append", default=[], metavar="PATH",
                   help="a LoRA adapter artifact (edgelm export ADAPTER --base MODEL) to chat with, applied unmerged")
    _add_generation_args(c)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="tok/s, TTFT, memory, size (and quality) of artifacts and runtimes, side by side")
    b.add_argument("models", nargs="*", help="artifact folders, HF folders or .gguf files")
    add_dataclass_args(b, BenchConfig, skip=("models",))
    b.set_defaults(func=cmd_bench)

    from edgelm.coop.config import ServeConfig

    sv = sub.add_parser("serve", help="OpenAI-compatible server: the device model answers, hard queries go to a cloud")
    add_dataclass_args(sv, ServeConfig)
    sv.set_defaults(func=cmd_serve)

    from edgelm.coop.config import RouteConfig

    rt = sub.add_parser("route", help="train the learned router, or judge routers on queries with known answers")
    rsub = rt.add_subparsers(dest="route_command", metavar="ACTION", parser_class=_Parser, required=True)
    for action, text in (("train", "fit the learned router on train-split queries (device vs cloud quality)"),
                         ("eval", "APGR, CPT(50%%)/CPT(80%%) and a quality-vs-share plot for every router")):
        a = rsub.add_parser(action, help=text)
        add_dataclass_args(a, RouteConfig)
        a.set_defaults(func=cmd_route)

    from edgelm.app.config import AppBuildConfig, AppServeConfig

    ap = sub.add_parser("app", help="the mobile app: pack artifacts into a web app (wrapped for Android), and serve it")
    asub = ap.add_subparsers(dest="app_command", metavar="ACTION", parser_class=_Parser, required=True)
    _command(asub, "build", "artifacts, runtime files and a router the page computes, in one servable folder",
             AppBuildConfig, cmd_app,
             ("artifacts", {"nargs": "+", "help": "GGUF and ONNX artifact folders; the first is the default model"}))
    _command(asub, "serve", "serve an app folder with the headers threads need, and proxy /v1 to a cloud",
             AppServeConfig, cmd_app, ("folder", {"help": "the folder `edgelm app build` wrote"}))

    ls = sub.add_parser("list", help="list architectures, built-in teachers, student shapes, KD losses, quant presets, "
                                     "targets, runtimes and routers")
    ls.add_argument("what", nargs="?", default="all", choices=["all", "archs", "teachers", "students", "losses",
                                                                "quants", "targets", "runtimes", "routers"])
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet = args.quiet or os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in NOISY_LOGGERS:  # third-party import-time chatter (e.g. torchao's missing CUDA kernels)
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args)
    except EdgelmError as e:
        print(f"edgelm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgelm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
