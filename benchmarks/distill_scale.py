"""A long distillation on this machine, its scaling curve, and the Pareto table of students against the teacher
quantized harder (writes the `distill_scale` section of docs/results.md, docs/distill_scale.png and
docs/distill_pareto.png).

    python benchmarks/distill_scale.py --max-tokens 2000000            # hours on 2 CPU cores; Ctrl-C is safe
    python benchmarks/distill_scale.py --max-tokens 2000000 --resume   # continue it from its last checkpoint

Training scores val and test sequences at every evaluation; the trainer's progress bar shows the ETA. The test
perplexity curve is fitted with a power law (floor + scale * tokens^-exponent), which says how many tokens the
student would need to reach the teacher Q4_0's test perplexity. The Pareto table exports the teacher at fp32, Q8_0,
Q4_K_M, Q4_0 and Q2_K and the student at fp32, GPTQ Q4_0 and llama.cpp Q4_K_M, all GGUF, and measures each in its
own llama.cpp process (`edgelm bench`, 1 thread): test perplexity and top-1, MiB and decode tok/s.

On a GPU machine (the `distill_scale_gpu` section), train there and bring the student back in parts, rounded to bf16:

    python benchmarks/distill_scale.py --device cuda --batch-size 256 --kd-chunk 8192 --lr 1e-3 --warmup-steps 50 \
        --max-tokens 100000000 --eval-every 100 --out /tmp/gpu --pack /tmp/pack          # there: no Pareto table
    python benchmarks/distill_scale.py --from-pack PARTS_DIR [PARTS_DIR ...] --out runs/gpu-scale   # here

`--pack` writes `student.pack.NNN` parts of at most 15 MiB (the student's weights as bf16: the high bytes
lzma-compressed, the low bytes raw), the run's metrics.jsonl and a summary with the throughput and MFU (counting the
teacher's forward). `--deadline-s` stops training with a checkpoint at that wall time and packs that checkpoint.
`--from-pack` rebuilds the student folder (fp32 from those bf16 weights) and writes the section with its Pareto rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import math
import platform
import shlex
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PART_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB

TEACHER_PRESETS = ["fp32", "llamacpp-q8_0", "llamacpp-q4_k_m", "llamacpp-q4_0", "llamacpp-q2_k"]
STUDENT_PRESETS = ["fp32", "gptq-int4-g32", "llamacpp-q4_k_m"]
TARGET = ("teacher", "llamacpp-q4_0")  # the artifact whose test perplexity the student should reach


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=2_000_000)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--eval-seqs", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-pareto", dest="pareto", action="store_false", help="skip the exports and the Pareto table")
    p.add_argument("--data", nargs="*", default=[], help="corpus sources (default: this Python's stdlib)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kd-chunk", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--pack", default=None, help="GPU machine: pack the student into parts in this folder (no Pareto)")
    p.add_argument("--deadline-s", type=float, default=None, help="stop training with a checkpoint at this wall time")
    p.add_argument("--from-pack", nargs="+", default=None, help="folders holding the parts of a --pack run")
    p.add_argument("--out", default="runs/bench-scale")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from edgelm.distill.api import distill
    from edgelm.errors import EdgelmError

    t0 = time.perf_counter()
    out = Path(a.out)
    try:
        if a.from_pack:
            _from_pack(a, out, t0)
            return
        kwargs = dict(teacher=a.teacher, layers=a.layers, intermediate_size=a.intermediate_size,
                      hidden_size=a.hidden_size, heads=a.heads, max_tokens=a.max_tokens, lr=a.lr,
                      eval_every=a.eval_every, ckpt_every=a.ckpt_every, eval_seqs=a.eval_seqs, eval_test=True,
                      data=tuple(a.data), device=a.device, batch_size=a.batch_size, kd_chunk=a.kd_chunk,
                      warmup_steps=a.warmup_steps, out=str(out / "run"), resume=a.resume, force=not a.resume)
        if a.pack:
            _train_and_pack(a, kwargs, out, Path(a.pack), t0)
            return
        res = distill(**kwargs)
        pareto = _pareto(a.teacher, res.student_dir, out) if a.pareto else None
    except EdgelmError as e:
        sys.exit(f"error: {e}")
    _write(a, res, pareto, time.perf_counter() - t0)


def _train_and_pack(a, kwargs: dict[str, Any], out: Path, pack: Path, t0: float) -> None:
    """Train (printing progress every 30 s; a checkpoint at --deadline-s), then pack the student and a summary."""
    import _thread

    import torch

    from edgelm.distill.api import distill
    from edgelm.distill.trainer import checkpoints, peak_flops
    from edgelm.errors import Interrupted
    from edgelm.report import read_metrics

    metrics = out / "run" / "metrics.jsonl"
    done = threading.Event()

    def progress() -> None:
        while not done.wait(30):
            recs = read_metrics(metrics) if metrics.exists() else []
            train = [r for r in recs if r.get("event") == "train"]
            ev = [r for r in recs if r.get("event") == "eval"]
            if train:
                r = train[-1]
                print(f"[{time.perf_counter() - t0:5.0f} s] step {r['step']} tokens {r['tokens']:,} loss "
                      f"{r['loss']:.3f} tok/s {r['tok_s']:,.0f} mfu {r.get('mfu', 0):.3f}"
                      + (f" | val {ev[-1]['val_ppl']:.2f} test {ev[-1].get('test_ppl', 0):.2f}" if ev else ""),
                      flush=True)

    threading.Thread(target=progress, daemon=True).start()
    timer = threading.Timer(a.deadline_s, _thread.interrupt_main) if a.deadline_s else None
    if timer:
        timer.start()
    finished = True
    try:
        res = distill(**kwargs, progress=False)
        from safetensors.torch import load_file

        state = load_file(str(res.student_dir / "model.safetensors"))
        config = json.loads((res.student_dir / "config.json").read_text())
        manifest: dict[str, Any] | None = res.manifest
    except Interrupted as e:  # --deadline-s: the checkpoint it wrote
        logging.info("%s", e)
        finished = False
        ckpt = checkpoints(out / "run")[-1]
        saved = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        state, config, manifest = saved["model"], saved["student_config"], None
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)  # the embedding, a second time
    finally:
        if timer:
            timer.cancel()
        done.set()
    wall = time.perf_counter() - t0
    recs = read_metrics(metrics)
    train = [r for r in recs if r.get("event") == "train"]
    steady = train[len(train) // 10 + 1:] or train  # without the first tenth (warm-up, allocator growth)
    summary = {
        "finished": finished, "wall_s": round(wall, 1), "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1]["tokens"] if train else 0,
        "tok_s_median": statistics.median(r["tok_s"] for r in steady) if steady else None,
        "mfu_median": statistics.median(r["mfu"] for r in steady) if steady and "mfu" in steady[0] else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__, "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                                                  if torch.cuda.is_available() else None),
        "peak_tflops": (peak_flops() or float("nan")) / 1e12 if torch.cuda.is_available() else None,  # what the MFU divides by
        "command": "python benchmarks/distill_scale.py " + shlex.join(sys.argv[1:]),
    }
    pack_student(state, config, pack, {"summary": summary, "manifest": manifest})
    shutil.copy(metrics, pack / "metrics.jsonl")
    print(json.dumps(summary), flush=True)


def pack_student(state: dict, config: dict, folder: Path, meta: dict[str, Any]) -> list[Path]:
    """The weights as bf16 in parts of at most PART_BYTES: a JSON index, the high bytes (sign, exponent, top mantissa
    bit; lzma compresses them to about 40%), the low bytes raw. Returns the parts; meta.json holds what rebuilds them."""
    import numpy as np
    import torch

    names = sorted(state)
    u16 = torch.cat([state[n].detach().to(torch.bfloat16).reshape(-1).view(torch.int16) for n in names])
    u16 = u16.numpy().view(np.uint16)  # [P]
    hi = lzma.compress((u16 >> 8).astype(np.uint8).tobytes(), preset=1)
    blob = hi + (u16 & 0xFF).astype(np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(blob), PART_BYTES):
        parts.append(folder / f"student.pack.{i // PART_BYTES:03d}")
        parts[-1].write_bytes(blob[i:i + PART_BYTES])
    index = {"names": names, "shapes": [list(state[n].shape) for n in names], "hi_bytes": len(hi),
             "params": int(u16.size), "sha256": hashlib.sha256(blob).hexdigest(), "parts": len(parts),
             "config": config, **meta}
    (folder / "meta.json").write_text(json.dumps(index, indent=1))
    logging.info("packed %d params into %d parts (%.1f MiB) in %s", u16.size, len(parts), len(blob) / 2**20, folder)
    return parts


def unpack_student(folders: list[Path]) -> tuple[dict, dict[str, Any]]:
    """(fp32 state dict, meta.json) from the parts of ``pack_student``, found across ``folders``; refuses a missing
    or altered part."""
    import numpy as np
    import torch

    from edgelm.errors import EdgelmError

    metas = [f / "meta.json" for f in folders if (f / "meta.json").exists()]
    if not metas:
        raise EdgelmError(f"no meta.json in {', '.join(map(str, folders))}; pass the folders --pack wrote")
    meta = json.loads(metas[0].read_text())
    parts = []
    for i in range(meta["parts"]):
        found = [f / f"student.pack.{i:03d}" for f in folders if (f / f"student.pack.{i:03d}").exists()]
        if not found:
            raise EdgelmError(f"part student.pack.{i:03d} of {meta['parts']} is in none of the folders given")
        parts.append(found[0].read_bytes())
    blob = b"".join(parts)
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise EdgelmError("the packed parts do not add up to what was packed (sha256 differs); copy them again")
    hi = np.frombuffer(lzma.decompress(blob[:meta["hi_bytes"]]), dtype=np.uint8).astype(np.uint16)
    lo = np.frombuffer(blob[meta["hi_bytes"]:], dtype=np.uint8).astype(np.uint16)
    flat = torch.from_numpy(((hi << 8) | lo).astype(np.uint16).view(np.int16)).view(torch.bfloat16).float()  # [P]
    state, at = {}, 0
    for name, shape in zip(meta["names"], meta["shapes"]):
        n = math.prod(shape)
        state[name] = flat[at:at + n].reshape(shape).clone()
        at += n
    return state, meta


def _from_pack(a, out: Path, t0: float) -> None:
    """Rebuild the packed student as an HF folder with a manifest, then the Pareto rows and the GPU section."""
    from edgelm.distill.api import evaluate
    from edgelm.fsutil import atomic_dir
    from edgelm.manifest import write_manifest
    from edgelm.models.loader import load_tokenizer, model_from_state, resolve

    state, meta = unpack_student([Path(f) for f in a.from_pack])
    model = model_from_state(meta["config"], state, what="the packed student",
                             fix="pack it again from the run that made it")
    run = out / "run"
    student_dir = run / "student"
    src = resolve(a.teacher)
    dev_manifest = meta.get("manifest") or {}
    with atomic_dir(student_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(src).save_pretrained(tmp)
        fields = {k: dev_manifest[k] for k in ("source", "data", "student", "training", "val") if k in dev_manifest}
        fields.setdefault("training", {})["transfer"] = "weights rounded to bf16 to come back from the GPU machine"
        fields["training"]["gpu_summary"] = meta["summary"]
        write_manifest(tmp, "student", **fields)
    shutil.copy(next(Path(f) / "metrics.jsonl" for f in a.from_pack if (Path(f) / "metrics.jsonl").exists()),
                run / "metrics.jsonl")
    seqs = a.eval_seqs
    here = {s: evaluate(str(student_dir), split=s, max_seqs=seqs).score for s in ("val", "test")}
    pareto = _pareto(a.teacher, student_dir, out) if a.pareto else None
    _write_gpu(a, meta, here, pareto, run, time.perf_counter() - t0)


def _pareto(teacher: str, student: Path, out: Path) -> list[dict]:
    """Export (or reuse) every artifact and bench each: test ppl and top-1 against its own fp32 model, size, decode."""
    from edgelm.artifact.api import export
    from edgelm.bench.api import bench
    from edgelm.manifest import read_manifest
    from edgelm.models.loader import resolve

    folders = {}
    for who, model, presets in (("teacher", teacher, TEACHER_PRESETS), ("student", str(student), STUDENT_PRESETS)):
        sha = resolve(model).sha256
        for preset in presets:
            folder = out / "artifacts" / f"{who}-{preset}"
            m = read_manifest(folder, verify=False) if (folder / "edgelm.json").exists() else None
            if m is None or m.get("source", {}).get("sha256") != sha:  # reuse only an export of this very model
                export(model=model, target="gguf", quant=preset, out=str(folder), force=True, check=False)
            folders[str(folder)] = (who, preset)
    result = bench(models=tuple(folders), threads=(1,), quality=True, split="test", eval_seqs=16, eval_seqlen=256,
                   repeat=3, progress=False)
    rows = []
    for r in result.rows:
        who, preset = folders[r["path"]]
        rows.append({"who": who, "preset": preset, "mib": r["size_bytes"] / 2**20, "ppl": r.get("ppl"),
                     "top1": r.get("top1_agree"), "tg": r.get("tg_tps_mean"), "error": r.get("error")})
    return rows


def _curve(evals: list[dict], docs: Path, png: str, teacher_val_ppl: float) -> str:
    """The table and plot of val and test perplexity against tokens."""
    from edgelm.report import md_table, plot_curves

    plot_curves({"val": evals, "test": [{**r, "val_ppl": r["test_ppl"]} for r in evals]}, "val_ppl", docs / png,
                ylabel="perplexity", hline=("teacher (val)", teacher_val_ppl), logy=True)
    rows = [[r["tokens"], r["val_ppl"], r["test_ppl"], r["test_top1"]] for r in evals]
    return md_table(["tokens", "val ppl", "test ppl", "test top-1"], rows) + f"\n![scaling curve]({png})\n"


def _pareto_text(pareto: list[dict] | None, docs: Path, png: str) -> tuple[str, float | None]:
    """(the Pareto table and plot, the teacher Q4_0's test ppl)."""
    from edgelm.metrics import pareto_front
    from edgelm.report import md_table, plot_pareto

    if not pareto:
        return "Pareto table skipped (--no-pareto).", None
    ok = [r for r in pareto if not r["error"]]
    front = pareto_front([(r["mib"], r["ppl"]) for r in ok])
    plot_pareto([{"label": r["preset"], "group": r["who"], "x": r["mib"], "y": r["ppl"], "front": f}
                 for r, f in zip(ok, front)], docs / png)
    target_ppl = next((r["ppl"] for r in ok if (r["who"], r["preset"]) == TARGET), None)
    rows = [[r["who"], r["preset"], r["mib"], r["ppl"], r["top1"], r["tg"], "yes" if f else ""]
            for r, f in zip(ok, front)]
    rows += [[r["who"], r["preset"], "", "", "", "", f"failed: {r['error']}"] for r in pareto if r["error"]]
    return (md_table(["model", "artifact (GGUF)", "MiB", "test ppl", "top-1 agree vs fp32",
                      "decode tok/s (llama.cpp, 1 thread)", "Pareto front"], rows)
            + f"\n![Pareto front]({png})\n"), target_ppl


def _fit(evals: list[dict], target_ppl: float | None) -> str:
    """The power-law fit of test nll against tokens, and the tokens it says reach ``target_ppl``."""
    from edgelm.metrics import fit_power_law

    pts = [(r["tokens"], math.log(r["test_ppl"])) for r in evals if r["tokens"] > 0]
    if len(pts) < 3:
        return "Too few evaluations for a fit."
    try:
        law = fit_power_law([t for t, _ in pts], [n for _, n in pts])
    except ValueError as e:
        return f"No fit: {e}."
    text = (f"Fit of test nll: {law.floor:.3f} + {law.scale:.3g} * tokens^-{law.exponent:.3f} (floor ppl "
            f"{math.exp(law.floor):.2f}).")
    if target_ppl:
        need = law.tokens_to_reach(math.log(target_ppl))
        text += (f" The teacher Q4_0's test ppl {target_ppl:.2f} is "
                 + (f"reached at about {need:,.0f} tokens by this fit." if need else
                    "below the fit's floor: more tokens alone will not reach it at this shape."))
    return text


def _write(a, res, pareto: list[dict] | None, wall: float) -> None:
    from edgelm.report import read_metrics, update_section

    docs = Path(a.docs)
    evals = [r for r in read_metrics(res.metrics_path) if r.get("event") == "eval" and "test_ppl" in r]
    curve = _curve(evals, docs, "distill_scale.png", res.val_teacher.ppl)
    pareto_text, target_ppl = _pareto_text(pareto, docs, "distill_pareto.png")
    cmd = "python benchmarks/distill_scale.py " + shlex.join(sys.argv[1:])
    t = res.manifest.get("training", {})
    body = f"""## A longer distillation and the student against the quantized teacher (`benchmarks/distill_scale.py`)

Command: `{cmd.strip()}` on {platform.machine()}; this invocation took {wall / 60:.0f} min; training
{t.get('precision', '?')} ({t.get('precision_reason', '')}). Student: {res.manifest['student']['layers']} blocks, hidden
{res.manifest['student'].get('hidden_size')}, MLP {res.manifest['student']['intermediate_size']}; {res.tokens_seen:,}
tokens seen; val and test = {a.eval_seqs} sequences of 256 tokens each.

{curve}
{_fit(evals, target_ppl)}

{pareto_text}"""
    update_section(docs / "results.md", "distill_scale", body)
    logging.info("wrote %s", docs / "results.md")


def _write_gpu(a, meta: dict[str, Any], here: dict, pareto: list[dict] | None, run: Path, wall: float) -> None:
    """The `distill_scale_gpu` section: the GPU run's throughput and MFU, its curve, and its student's Pareto rows."""
    from edgelm.report import md_table, read_metrics, update_section

    docs = Path(a.docs)
    sm = meta["summary"]
    recs = read_metrics(run / "metrics.jsonl")
    evals = [r for r in recs if r.get("event") == "eval" and "test_ppl" in r]
    teacher_val_ppl = next(r["val_ppl"] for r in recs if r.get("event") == "teacher")  # scored on the GPU machine
    curve = _curve(evals, docs, "distill_scale_gpu.png", teacher_val_ppl)
    pareto_text, target_ppl = _pareto_text(pareto, docs, "distill_pareto_gpu.png")
    m = meta.get("manifest") or {}
    st, tr = m.get("student", {}), m.get("training", {})
    cfg = meta["config"]
    last = evals[-1] if evals else {}
    back = md_table(["split", "ppl there (fp32 master weights)", "ppl here (weights rounded to bf16)", "top-1 here"],
                    [[s, last.get(f"{s}_ppl", ""), here[s].ppl, here[s].top1] for s in ("val", "test")])
    cmd = "python benchmarks/distill_scale.py " + shlex.join(sys.argv[1:])
    stopped = "" if sm["finished"] else " It was stopped at its deadline, before the end of its schedule."
    body = f"""## The same distillation on a GPU (`benchmarks/distill_scale.py --pack`, then `--from-pack`)

There: `{sm['command']}` on one {sm['device']} (torch {sm['torch']}), {sm['wall_s'] / 60:.1f} min in all,
{sm['steps']:,} steps, {sm['tokens']:,} tokens.{stopped} Training {tr.get('precision', 'bf16')}; peak GPU memory
{sm['peak_gib'] or 0:.1f} GiB. Student: {cfg['num_hidden_layers']} blocks, hidden {cfg['hidden_size']}, MLP
{cfg['intermediate_size']} ({st.get('params') or meta['params']:,} parameters), pruned from the teacher as on the CPU.

**Throughput:** {sm['tok_s_median'] or 0:,.0f} tok/s (median step after the first tenth), **MFU
{100 * (sm['mfu_median'] or 0):.1f}%** of {sm.get('peak_tflops') or 989:.0f} TFLOP/s dense bf16 (the datasheet's
peak for this GPU), counting 6 x the student's parameters for its forward and backward and 2 x the teacher's for
its forward, per token.

Here: `{cmd.strip()}`, {wall / 60:.0f} min (the student comes back rounded to bf16, in parts).

{back}
The student rows of the Pareto table start from those bf16-rounded weights: its fp32 GGUF holds them widened back to
fp32, and GPTQ and llama.cpp quantize them.

{curve}
{_fit(evals, target_ppl)}

{pareto_text}"""
    update_section(docs / "results.md", "distill_scale_gpu", body)
    logging.info("wrote %s", docs / "results.md")


if __name__ == "__main__":
    main()
