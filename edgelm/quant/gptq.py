"""GPTQ through GPTQModel 7.6.0 (the last release that accepts torch 2.13), run in a child process.

GPTQModel computes per-layer calibration Hessians, a damped Cholesky inverse and lazy block updates with group-wise
scales. The child writes a GPTQ v1 checkpoint; the parent reads back the exact codes and scales and rebuilds the
artifact with the source's float32 embeddings and norms (GPTQModel keeps those in bf16).

    python -m edgelm.quant.gptq SRC_FOLDER CALIB.npy OUT_FOLDER BITS GROUP SYM ACT_ORDER DAMP MSE DEVICE
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)


def run_gptq(src: str, calib_path: Path, out: Path, *, bits: int, group_size: int, sym: bool, act_order: bool,
             damp: float, mse: float, device: str, log_path: Path) -> None:
    """Quantize ``src`` (an HF folder) with GPTQModel in a child process; raise with the child's last line on failure."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1))),
           "PYTHONUNBUFFERED": "1"}  # the child imports the installed edgelm
    # cwd: GPTQModel writes a ./logs folder; keep it inside the temporary work folder, not the user's cwd.
    src = src if not Path(src).exists() else str(Path(src).resolve())
    args = [sys.executable, "-m", "edgelm.quant.gptq", src, str(calib_path.resolve()), str(out.resolve()), str(bits), str(group_size),
            str(int(sym)), str(int(act_order)), str(damp), str(mse), device]
    with open(log_path, "w", encoding="utf-8") as logf:
        rc = subprocess.run(args, stdout=logf, stderr=subprocess.STDOUT, env=env,
                            cwd=log_path.resolve().parent).returncode
    if rc != 0:
        lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        from edgelm.fsutil import keep_log

        raise EdgelmError(f"GPTQ failed (exit {rc}): {lines[-1][:300] if lines else 'no output'} "
                          f"(full log: {keep_log(log_path, 'gptq')})")


def _main(argv: list[str]) -> None:
    import numpy as np
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    src, calib_path, out, bits, group, sym, act_order, damp, mse, device = argv
    calib = np.load(calib_path)  # [N, T] int token ids from the train split
    qc = QuantizeConfig(bits=int(bits), group_size=int(group), sym=bool(int(sym)), desc_act=bool(int(act_order)),
                        static_groups=bool(int(act_order)), damp_percent=float(damp), mse=float(mse))
    model = GPTQModel.load(src, qc, device=device, dtype=torch.float32)
    rows = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in calib]
    model.quantize(rows, batch_size=min(4, len(rows)))
    model.save(out)


if __name__ == "__main__":
    _main(sys.argv[1:])
