"""Models of 1B-8B parameters on this machine: edgelm's quantize and export beside llama.cpp's own tools, on the same
files, each command in its own process, timed, with its peak RSS (/usr/bin/time -v).

    python benchmarks/scale.py                        # 135M, 1B (Llama-3.2-1B's shape)
    python benchmarks/scale.py --sizes 135m 1b 8b     # and Llama-3.1-8B's shape (16 GB of bf16 safetensors)
    python benchmarks/scale.py --sizes 1b --gguf --check 1b --append   # only the 1B's export with its check, kept
                                                                       # beside the rows already in docs/scale.json

The models are random-weight Llamas in the real shapes (vocab 128,256) with SmolLM2's tokenizer, written as bf16
safetensors shards by this script (made once, under --work). llama.cpp's `convert_hf_to_gguf.py` comes from the
llama.cpp that llama-cpp-python vendors (downloaded once from PyPI with its gguf-py), `llama-quantize` from
`make llama-quantize`. Writes docs/results.md (section "scale"), docs/scale.png and docs/scale.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

from edgelm.report import md_table, update_section  # noqa: E402

# Llama shapes: hidden, layers, heads, kv heads, MLP width, vocab, tied
SHAPES = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-1B
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),  # Llama-3.1-8B
}
LLAMA_CPP_PYTHON = "0.3.36"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_model(size: str, out: Path) -> Path:
    """A random-weight Llama of ``size``'s shape as bf16 safetensors, one shard per block (written block by block:
    the 8B never sits in memory), with SmolLM2's tokenizer. Made once."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from edgelm.models.loader import resolve

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = SHAPES[size]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    head = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head
    rng = np.random.default_rng(0)

    def rand(*shape) -> "torch.Tensor":
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).bfloat16()

    shards: list[dict] = [{"model.embed_tokens.weight": rand(s["vocab_size"], h),
                           "model.norm.weight": torch.ones(h).bfloat16()}]
    if not s["tie_word_embeddings"]:
        shards.append({"lm_head.weight": rand(s["vocab_size"], h)})
    names = []
    n = len(shards) + layers
    for i, shard in enumerate(shards):
        names.append(f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        save_file(shard, str(tmp / names[-1]), metadata={"format": "pt"})
    weight_map = {k: names[i] for i, shard in enumerate(shards) for k in shard}
    del shards
    for i in range(layers):
        p = f"model.layers.{i}."
        block = {p + "input_layernorm.weight": torch.ones(h).bfloat16(),
                 p + "post_attention_layernorm.weight": torch.ones(h).bfloat16(),
                 p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                 p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                 p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                 p + "mlp.down_proj.weight": rand(h, inter)}
        name = f"model-{len(names) + 1:05d}-of-{n:05d}.safetensors"
        save_file(block, str(tmp / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in block})
        logging.info("%s: block %d/%d written", size, i + 1, layers)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok_dir = Path(resolve("smollm2-135m-instruct").path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(**s, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def llama_convert(work: Path) -> tuple[Path, Path]:
    """(convert_hf_to_gguf.py, its gguf-py) from the llama.cpp that llama-cpp-python vendors, downloaded once."""
    root = work / "llama-convert"
    script, gguf_py = root / "convert_hf_to_gguf.py", root / "gguf-py"
    if not script.is_file():
        dl = work / "llama-sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dl)], check=True)
        shutil.unpack_archive(str(dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"), str(dl))
        src = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "gguf-py", gguf_py, dirs_exist_ok=True)
        shutil.copytree(src / "conversion", root / "conversion", dirs_exist_ok=True)  # its per-arch modules
        shutil.copyfile(src / "convert_hf_to_gguf.py", script)
        shutil.rmtree(dl)
    return script, gguf_py


def llama_quantize() -> str:
    found = shutil.which("llama-quantize") or shutil.which("llama-quantize", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("llama-quantize is missing: run `make llama-quantize`")
    return found


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: {"seconds", "peak_rss_mib", "rc"} (the peak is the largest process of
    the tree, as time reports it: a child's, when the command runs one)."""
    stats = log.with_suffix(".time")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", "-o", str(stats), *cmd], stdout=f,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats.read_text())
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(int(rss.group(1)) / 1024) if rss else None, "rc": rc}


def edgelm(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgelm", *args]


DISTILL = ["--layers", "4", "--hidden-size", "1024", "--heads", "16", "--intermediate-size", "2048", "--seq-len", "256",
           "--batch-size", "4", "--max-steps", "8", "--calib-seqs", "4", "--eval-seqs", "4", "--eval-every", "0",
           "--ckpt-every", "0", "--no-progress"]


def distill_note(run: Path) -> str:
    """Training tok/s (the median step after the first) and the teacher's dtype, from a distill run's folder."""
    import statistics

    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_s"] for r in steps if r.get("event") == "train"][1:]
    m = json.loads((run / "student" / "edgelm.json").read_text())
    return (f"{statistics.median(tps):,.0f} tok/s, teacher {m['training']['teacher_dtype']}, "
            f"student {m['student']['params'] / 1e6:.0f}M params")


def check_note(artifact: Path) -> str:
    """The check's figures from an exported artifact's manifest: KLD from fp32 and against the checkpoint."""
    p = json.loads((artifact / "edgelm.json").read_text())["parity"]
    ex = p.get("exact", {})
    return (f"KLD {p['kld']:.3f} from fp32 (random weights), {ex.get('kld', float('nan')):.4f} from the checkpoint "
            f"(allowed {ex.get('max_kld_vs_checkpoint', float('nan')):.3f}), {ex.get('greedy_identical', 0)}+"
            f"{ex.get('greedy_ties', 0)} of {ex.get('greedy_prompts', 0)} prompts greedy-identical or tied")


def rows_for(size: str, model: Path, work: Path, kinds: set[str]) -> list[dict]:
    """The commands of ``kinds`` on one model: llama.cpp's converter and quantizer, then edgelm's. Each output is
    removed once no later command reads it (the 8B's would not fit on the disk together)."""
    out = work / f"out-{size}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def export(target: str, quant: str, name: str, *extra: str) -> list[str]:
        return edgelm("export", str(model), "--target", target, "--quant", quant, *extra, "--out", str(out / name))

    # (tool, command, argv, outputs removed after it, a note read from the outputs first)
    plan: list[tuple[str, str, list[str], list[str], Callable[[], str] | None]] = []
    if "gguf" in kinds:
        script, _ = llama_convert(work)  # the converter puts its own gguf-py ahead of the installed one
        plan += [
            ("llama.cpp", "convert_hf_to_gguf --outtype f16",
             [sys.executable, str(script), str(model), "--outtype", "f16", "--outfile", str(out / "f16.gguf")], [],
             None),
            ("llama.cpp", "convert_hf_to_gguf --outtype q8_0",
             [sys.executable, str(script), str(model), "--outtype", "q8_0", "--outfile", str(out / "q8.gguf")],
             ["q8.gguf"], None),
            ("llama.cpp", "llama-quantize f16 -> Q4_0",
             [llama_quantize(), str(out / "f16.gguf"), str(out / "q4_0.gguf"), "Q4_0", str(os.cpu_count() or 1)],
             ["f16.gguf", "q4_0.gguf"], None),
            ("edgelm", "export --target gguf --quant fp16 --no-check", export("gguf", "fp16", "e-fp16", "--no-check"),
             ["e-fp16"], None),
            ("edgelm", "export --target gguf --quant int4-g32 --no-check",
             export("gguf", "int4-g32", "e-int4", "--no-check"), ["e-int4"], None),
            ("edgelm", "export --target gguf --quant int8-g32 --no-check",
             export("gguf", "int8-g32", "e-int8", "--no-check"), ["e-int8"], None),
        ]
    if "onnx" in kinds:
        plan.append(("edgelm", "export --target onnx --quant int4-g32 --no-check",
                     export("onnx", "int4-g32", "e-onnx", "--no-check"), ["e-onnx"], None))
    if "tvm" in kinds:
        plan.append(("edgelm", "export --target tvm --quant int4-g32 --no-check",
                     export("tvm", "int4-g32", "e-tvm", "--no-check"), ["e-tvm"], None))
    if "gptq" in kinds:
        plan.append(("edgelm", "quantize --quant gptq-int4-g32 --calib-samples 32 (32 x 512 tokens)",
                     edgelm("quantize", str(model), "--quant", "gptq-int4-g32", "--calib-samples", "32",
                            "--eval-seqs", "8", "--out", str(out / "e-gptq")), ["e-gptq"], None))
    if "check" in kinds:
        # random weights: KLD from fp32 far above a real model's, so the quality gate is raised (--max-kld); the
        # exact-pack checks against the dequantized checkpoint keep their bounds
        plan.append(("edgelm", "export --target gguf --quant int4-g32 (with the check: 8 x 128 tokens, 2 prompts)",
                     export("gguf", "int4-g32", "e-check", "--eval-seqs", "8", "--prompts", "2", "--max-kld", "20"),
                     ["e-check"], lambda: check_note(out / "e-check")))
    if "distill" in kinds:
        plan.append(("edgelm", "distill " + " ".join(DISTILL[:8]) + " (8 steps of 4 x 256 tokens)",
                     edgelm("distill", "--teacher", str(model), *DISTILL, "--out", str(out / "e-distill")),
                     ["e-distill"], lambda: distill_note(out / "e-distill")))
    rows = []
    for tool, what, cmd, done, note in plan:
        logging.info("%s: %s %s", size, tool, what)
        r = measure(cmd, out / f"{len(rows)}.log")
        if note is not None and r["rc"] == 0:
            r["note"] = note()
        rows.append({"size": size, "params": params(model), "tool": tool, "command": what, **r})
        logging.info("  %s", r)
        for name in done:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
    return rows


def params(model: Path) -> int:
    import math

    from edgelm.models.weights import LazySafetensors, safetensors_files

    t = LazySafetensors(safetensors_files(model))
    return sum(math.prod(t.shape(k)) for k in t)


def plot(rows: list[dict], path: Path) -> Path:
    """Peak RSS and wall time against parameters, one line per command."""
    from edgelm.report import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (tool, what) in dict.fromkeys((r["tool"], r["command"]) for r in rows):
        pts = sorted((r["params"] / 1e9, r["peak_rss_mib"], r["seconds"]) for r in rows
                     if (r["tool"], r["command"]) == (tool, what) and r["rc"] == 0)
        if not pts:
            continue
        x = [p[0] for p in pts]
        style = "-o" if tool == "edgelm" else "--s"
        axes[0].plot(x, [p[1] / 1024 for p in pts], style, label=f"{tool}: {what}")
        axes[1].plot(x, [p[2] for p in pts], style, label=f"{tool}: {what}")
    axes[0].set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="memory")
    axes[1].set(xlabel="parameters (billions)", ylabel="wall time (s)", title="time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


KINDS = {  # row kind -> the sizes it runs on by default
    "gguf": ["135m", "1b", "8b"],  # llama.cpp's convert and quantize, edgelm's GGUF exports
    "onnx": ["135m", "1b"],  # the onnxruntime-genai builder holds the whole model: 6.3 GB at 1B
    "tvm": ["135m", "1b"],
    "gptq": ["135m"],  # GPTQModel on a CPU: hours for an 8B
    "check": ["1b", "8b"],
    "distill": ["1b"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["135m", "1b"], choices=list(SHAPES))
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench-scale-models")
    for kind, sizes in KINDS.items():
        ap.add_argument(f"--{kind}", nargs="*", default=sizes, choices=list(SHAPES),
                        help=f"sizes that run the {kind} rows (default: {' '.join(sizes)}; none: the flag alone)")
    ap.add_argument("--append", action="store_true",
                    help="keep docs/scale.json's other rows (a row of the same model and command is replaced)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for size in args.sizes:
        model = make_model(size, args.work / size)
        rows += rows_for(size, model, args.work, {k for k in KINDS if size in getattr(args, k)})
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    path = ROOT / "docs/scale.json"
    old = json.loads(path.read_text()) if args.append and path.is_file() else {"rows": [], "commands": []}
    new = {(r["size"], r["command"]) for r in rows}
    order = list(SHAPES)
    rows = sorted([r for r in old["rows"] if (r["size"], r["command"]) not in new] + rows,
                  key=lambda r: order.index(r["size"]))  # stable: each model's rows in run order
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "commands": [*old.get("commands", []), command],
              "rows": rows}
    path.write_text(json.dumps(result, indent=1))
    table = md_table(["model", "tool", "command", "peak RSS (MiB)", "wall (s)", "note"],
                     [[r["size"], r["tool"], r["command"], r["peak_rss_mib"], r["seconds"] if r["rc"] == 0 else
                       f"failed ({r['rc']})", r.get("note", "")] for r in rows])
    plot(rows, ROOT / "docs/scale.png")
    runs = "\n".join(f"`{c}`" for c in result["commands"])
    update_section(ROOT / "docs/results.md", "scale",
                   f"{runs}\n\non {result['cpu']} ({result['cores']} cores)\n\n{table}\n\n![scale](scale.png)")
    print(table)


if __name__ == "__main__":
    main()
