"""Greedy tokens from a TVM artifact with nothing but TVM's runtime and numpy: what runs an aarch64 library under
emulation (an arm64 Python under qemu-user, the aarch64 apache-tvm wheel), where edgelm's own dependencies are not.

    python -m edgelm.runtimes.tvm_greedy ARTIFACT 1,2,3 16     # prints the 16 greedy ids after the prompt as JSON
    python runtimes/tvm_greedy.py ARTIFACT 1,2,3 16            # the same, as a plain script
    python tvm_greedy.py --bench ARTIFACT 1,2,3 16 3 0 2       # timings as JSON: gen 16, 3 runs, 0 sustained, 2 threads

The --bench form is what `edgelm bench --device ssh://` (and qemu-aarch64) runs on a device for TVM rows.

Session is the one home of the VM and KV-cache calls (runtimes/tvmrt.py uses it too); kept free of edgelm imports.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PAGE_SIZE = 16  # KV cache tokens per page


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


class Session:
    """One sequence in a TVM artifact's paged KV cache: the Relax VM, its params and the cache calls. The TVM runtime
    (runtimes/tvmrt.py) and greedy() below both drive the artifact through it."""

    def __init__(self, library: str | Path, cfg: dict, arrays: dict, context: int, remote=None) -> None:
        """``remote``: a TVM RPC session (tvm.rpc.connect): the library is uploaded and runs there."""
        import numpy as np
        import tvm
        from tvm import relax

        if remote is not None:
            remote.upload(str(library))
            self.dev, module = remote.cpu(), remote.load_module(Path(library).name)
        else:
            self.dev, module = tvm.cpu(), tvm.runtime.load_module(str(library))
        self.vm = relax.VirtualMachine(module, self.dev)
        self._item = None
        if remote is not None:
            self.params = _remote_params(remote, cfg["params"], arrays)
            self._item = remote.get_function("ffi.ArrayGetItem")
        else:
            self.params = [tvm.runtime.tensor(np.ascontiguousarray(arrays[k]), self.dev) for k in cfg["params"]]
        self.chunk = int(cfg["decoder"]["prefill_chunk"])  # the most tokens one prefill call takes
        # shapes are built where the VM runs: an RPC call cannot carry a local Shape object, only a remote one
        S = self._S = (lambda dims: remote.get_function("ffi.Shape")(*dims)) if remote is not None \
            else tvm.runtime.ShapeTuple
        self.kv = self.vm["create_kv_cache"](S([1]), S([context]), S([self.chunk]), S([PAGE_SIZE]), S([0]))
        f = remote.get_function if remote is not None else tvm.get_global_func
        self._add, self._clear = f("vm.builtin.kv_state_add_sequence"), f("vm.builtin.kv_state_clear")
        self._begin, self._end = f("vm.builtin.kv_state_begin_forward"), f("vm.builtin.kv_state_end_forward")
        self._popn = f("vm.builtin.kv_state_popn")
        self._add(self.kv, 0)
        self.length = 0  # tokens in the KV cache

    def reset(self) -> None:
        self._clear(self.kv)
        self._add(self.kv, 0)
        self.length = 0

    def forward(self, fn: str, ids, read: bool = True) -> np.ndarray | None:
        """Append ``ids`` (at most ``chunk``) to the sequence through ``fn``; returns its logits [1, s or 1, V]
        (None with ``read`` False: they stay on the device)."""
        import numpy as np
        import tvm

        x = tvm.runtime.tensor(np.asarray([ids], dtype=np.int32), self.dev)  # [1, s]
        self._begin(self.kv, self._S([0]), self._S([len(ids)]))
        out = self.vm[fn](x, self.kv, self.params)
        if self._item is not None:  # a remote (logits, kv) tuple: its items fetched by reference
            out = (self._item(out, 0), self._item(out, 1))
        logits, self.kv = out
        self._end(self.kv)
        self.length += len(ids)
        return logits.numpy() if read else None

    def prefill(self, ids, fn: str = "prefill") -> list:
        """Start the sequence afresh with ``ids``, in chunks; returns each chunk's logits."""
        self.reset()
        return self.extend(ids, fn)

    def extend(self, ids, fn: str = "prefill") -> list:
        """Append ``ids`` to the sequence, in chunks; returns each chunk's logits."""
        return [self.forward(fn, ids[i:i + self.chunk]) for i in range(0, len(ids), self.chunk)]

    def rewind(self, n: int) -> None:
        """Keep the first ``n`` tokens of the sequence (the paged cache pops the rest)."""
        if n < self.length:
            self._popn(self.kv, 0, self.length - n)
            self.length = n

    def close(self) -> None:
        self.kv = self.vm = self.params = None


def _remote_params(remote, names: list, arrays: dict):
    """The params as an Array owned by the device, as MLC loads them: written here as TVM's tensor cache (raw),
    uploaded, loaded there, and gathered there by name. (Tensors sent as RPC arguments arrive as views whose
    shapes live only as long as the call: an Array made of them on the device reads garbage shapes later.)"""
    import tempfile

    import numpy as np
    from tvm.contrib import tvmjs

    with tempfile.TemporaryDirectory(prefix="edgelm-rpc-params-") as tmp:
        tvmjs.dump_tensor_cache({k: np.ascontiguousarray(arrays[k]) for k in names}, tmp, encode_format="raw",
                                show_progress=False)
        for f in sorted(Path(tmp).iterdir()):
            remote.upload(str(f), target=f.name)  # the session's own folder (a subfolder is not made there)
    where = remote.get_function("tvm.rpc.server.workpath")("")
    remote.get_function("vm.builtin.tensor_cache.load")(where, 1, 0)  # kDLCPU, device 0
    return remote.get_function("vm.builtin.param_array_from_cache_by_name_unpacked")(*names)


def greedy(folder: str | Path, prompt: list[int], n: int, threads: int = 1) -> list[int]:
    import os

    import numpy as np

    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    folder = Path(folder)
    cfg = json.loads((folder / "tvm_config.json").read_text())
    s = Session(folder / "model.so", cfg, read_safetensors(folder / "params.safetensors"),
                int(cfg["decoder"]["context"]))
    logits = s.prefill(prompt)[-1][0, -1]  # [V]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = s.forward("decode", [out[-1]])[0, -1]
    return out


def bench(folder: str | Path, prompt: list[int], n: int, repeat: int, sustained: int, threads: int,
          remote=None) -> dict:
    """Load, one warm-up, then ``repeat`` timed greedy runs (and ``sustained`` more, decode only): seconds of the load,
    and per run of the prefill (ids in -> logits out), the first token and the decode (first -> last token).
    ``remote`` (a TVM RPC session): the library runs there, timed from here; decode then feeds the first token back
    each step instead of reading every step's logits over the link (the speed is the same, the text is not)."""
    import os
    import time

    import numpy as np
    import tvm

    t0 = time.perf_counter()
    folder = Path(folder)
    cfg = json.loads((folder / "tvm_config.json").read_text())
    if remote is None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    s = Session(folder / "model.so", cfg, read_safetensors(folder / "params.safetensors"),
                int(cfg["decoder"]["context"]), remote=remote)
    get = remote.get_function if remote is not None else tvm.get_global_func
    get("runtime.config_threadpool")(-3, threads)
    load_s = time.perf_counter() - t0

    def run(k: int) -> tuple[float, float, float]:
        a = time.perf_counter()
        logits = s.prefill(prompt)[-1][0, -1]  # [V]
        b = time.perf_counter()
        tok = int(np.argmax(logits))
        c = time.perf_counter()
        for _ in range(k - 1):
            out = s.forward("decode", [tok], read=remote is None)
            tok = tok if out is None else int(np.argmax(out[0, -1]))
        return b - a, c - a, time.perf_counter() - c

    run(min(n, 8))  # warm-up
    runs = [run(n) for _ in range(repeat)]
    more = [run(n)[2] for _ in range(sustained)]
    s.close()
    return {"load_s": load_s, "prefill_s": [r[0] for r in runs], "ttft_s": [r[1] for r in runs],
            "decode_s": [r[2] for r in runs], "sustained_decode_s": more,
            "threads": int(get("runtime.NumThreads")()), "tvm": tvm.__version__}


if __name__ == "__main__":
    if sys.argv[1] == "--bench":
        folder, ids, n, repeat, sustained, threads = sys.argv[2:8]
        print(json.dumps(bench(folder, [int(t) for t in ids.split(",")], int(n), int(repeat), int(sustained),
                               int(threads))))
    else:
        print(json.dumps(greedy(sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3]))))
