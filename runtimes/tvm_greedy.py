"""Greedy tokens from a TVM artifact with nothing but TVM's runtime and numpy: what runs an aarch64 library under
emulation (an arm64 Python under qemu-user, the aarch64 apache-tvm wheel), where edgelm's own dependencies are not.

    python -m edgelm.runtimes.tvm_greedy ARTIFACT 1,2,3 16     # prints the 16 greedy ids after the prompt as JSON
    python runtimes/tvm_greedy.py ARTIFACT 1,2,3 16            # the same, as a plain script

Same calls as runtimes/tvmrt.py (prefill in chunks, then one decode per token); kept free of edgelm imports.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path


def read_safetensors(path: Path) -> dict:
    """name -> numpy array (the safetensors layout: a little-endian u64 header length, a JSON header, the data)."""
    import numpy as np

    dtypes = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "U32": np.uint32, "I32": np.int32}
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


def greedy(folder: str | Path, prompt: list[int], n: int, threads: int = 1) -> list[int]:
    import os

    import numpy as np

    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import tvm
    from tvm import relax

    folder = Path(folder)
    cfg = json.loads((folder / "tvm_config.json").read_text())
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), dev)
    arrays = read_safetensors(folder / "params.safetensors")
    params = [tvm.runtime.tensor(np.ascontiguousarray(arrays[k]), dev) for k in cfg["params"]]
    ctx, chunk = int(cfg["decoder"]["context"]), int(cfg["decoder"]["prefill_chunk"])
    S = tvm.runtime.ShapeTuple
    kv = vm["create_kv_cache"](S([1]), S([ctx]), S([chunk]), S([16]), S([0]))
    f = tvm.get_global_func
    f("vm.builtin.kv_state_add_sequence")(kv, 0)
    begin, end = f("vm.builtin.kv_state_begin_forward"), f("vm.builtin.kv_state_end_forward")

    def run(fn: str, ids: list[int]):
        nonlocal kv
        begin(kv, S([0]), S([len(ids)]))
        logits, kv = vm[fn](tvm.runtime.tensor(np.asarray([ids], dtype=np.int32), dev), kv, params)
        end(kv)
        return logits.numpy()[0, -1]  # [V]

    for i in range(0, len(prompt), chunk):
        logits = run("prefill", prompt[i:i + chunk])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = run("decode", [out[-1]])
    return out


if __name__ == "__main__":
    print(json.dumps(greedy(sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3]))))
