"""The aarch64 TVM library, run for real: under qemu-user, with an arm64 Python and the aarch64 apache-tvm wheel
(`make tvm-aarch64` unpacks them into build/arm64-root), against the x86-64 build of the same checkpoint.

    python benchmarks/tvm_aarch64.py --root build/arm64-root

Exports the model (default: the bench-scale student's gptq-int4-g32 checkpoint) for x86-64 and for aarch64, runs
runtimes/tvm_greedy.py on both (the aarch64 one under qemu-aarch64-static), compares their greedy tokens on a few
test-split prompts and writes the result into docs/results.md (section "tvm_aarch64").
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from edgelm.report import md_table, update_section

MODEL = ROOT / "runs/bench-mixed/student/quantized-gptq-int4-g32"
GREEDY = ROOT / "runtimes/tvm_greedy.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT / "build/arm64-root"), help="the arm64 root (make tvm-aarch64)")
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--quant", default="gptq-int4-g32")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "runs/tvm-aarch64"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    a = p.parse_args()
    from transformers import AutoTokenizer

    from edgelm.artifact.api import export
    from edgelm.converters.tvm import LIB_FILE, elf_machine
    from edgelm.quant.quality import val_sequences

    out, root = Path(a.out), Path(a.root).resolve()
    arts = {}
    for arch in ("x86-64", "aarch64"):
        arts[arch] = out / arch
        if not (arts[arch] / "edgelm.json").is_file():
            export(model=a.model, target="tvm", quant=a.quant, arch=arch, out=str(arts[arch]), force=True)
    tok = AutoTokenizer.from_pretrained(arts["x86-64"])
    prompts = [[int(t) for t in s] for s in val_sequences(tok, (), "text", a.prompts, 32)]
    py = root / "usr/bin/python3.11"
    rows, same = [], 0
    for i, ids in enumerate(prompts):
        got = {}
        for arch in ("x86-64", "aarch64"):
            cmd = [sys.executable, str(GREEDY), str(arts[arch]), ",".join(map(str, ids)), str(a.tokens)]
            if arch == "aarch64":  # qemu -L: the arm64 root's files (its stdlib, the wheels in dist-packages) first
                cmd = ["qemu-aarch64-static", "-L", str(root), str(py), *cmd[1:]]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if r.returncode:
                sys.exit(f"benchmarks/tvm_aarch64.py: the {arch} run failed: {r.stderr.strip().splitlines()[-1]}")
            got[arch] = (json.loads(r.stdout.strip().splitlines()[-1]), time.perf_counter() - t0)
        equal = got["x86-64"][0] == got["aarch64"][0]
        same += equal
        rows.append([i, len(ids), a.tokens, "yes" if equal else "no", f"{got['x86-64'][1]:.1f}",
                     f"{got['aarch64'][1]:.1f}", repr(tok.decode(got["aarch64"][0]))[:60]])
    machine = elf_machine(arts["aarch64"] / LIB_FILE)
    cmd = "python " + shlex.join(["benchmarks/tvm_aarch64.py", *sys.argv[1:]])
    body = f"""## TVM's aarch64 library, run under emulation
`{cmd}`: `{a.model}` ({a.quant}) exported with `--arch aarch64` (ELF machine {machine}, AArch64) and with
`--arch x86-64`; each runs `runtimes/tvm_greedy.py` (TVM's runtime and numpy only), the aarch64 one in an arm64
Python 3.11 under qemu-aarch64-static with the aarch64 apache-tvm 0.27.0.post1 wheel (`make tvm-aarch64` unpacks
Debian's arm64 packages and the PyPI wheels; no chroot). Greedy tokens after {a.prompts} val-split prompts of 32
tokens: **{same}/{len(prompts)} identical** to the x86-64 build's. Seconds are whole processes (load included);
qemu's say nothing about a phone's speed.

{md_table(["prompt", "tokens in", "tokens out", "identical", "x86-64 s", "aarch64 (qemu) s", "aarch64 text"], rows)}
"""
    update_section(Path(a.docs) / "results.md", "tvm_aarch64", body)
    print(body)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
