"""Apache TVM backend: an edgelm TVM artifact (model.so + params.safetensors + tvm_config.json) in the Relax VM,
with TVM's paged KV cache. Generation, sampling, stops and streaming come from the base Runtime."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from edgelm.converters.tvm import CONFIG_FILE, LIB_FILE, PARAMS_FILE
from edgelm.errors import EdgelmError, require
from edgelm.runtimes.base import Runtime, check_threads, default_threads
from edgelm.runtimes.text import TextTokenizer
from edgelm.runtimes.tvm_greedy import Session

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

class TvmRuntime(Runtime):
    """A compiled TVM artifact. ``library``: run another build of the same module (the export check of a cross
    build runs the host build of the same IR and params)."""

    name = "tvm"
    extra = "tvm"
    formats = ("tvm",)

    def __init__(self, folder: str | Path, *, threads: int | None = None, context: int | None = None,
                 library: str | Path | None = None) -> None:
        check_threads(threads)
        folder = Path(folder)
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.is_file() or not (folder / PARAMS_FILE).is_file():
            raise EdgelmError(f"{folder} is not a TVM artifact ({CONFIG_FILE}, {LIB_FILE} and {PARAMS_FILE} expected)")
        try:
            self.tvm_config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
            dec = self.tvm_config["decoder"]
            names = self.tvm_config["params"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EdgelmError(f"{cfg_path} is not a valid TVM config ({e}); re-export the artifact") from None
        lib_path = Path(library) if library else folder / LIB_FILE
        tvm = require("tvm", "tvm")
        _check_library(lib_path, self.tvm_config, tvm.__version__)
        size = (folder / PARAMS_FILE).stat().st_size + lib_path.stat().st_size
        if threads is None:
            threads, why = default_threads(size)
            log.info("tvm: %d thread(s) (%s); --threads to change", threads, why)
        _set_threads(tvm, threads)
        tok = TextTokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
        model_ctx = int(dec["context"])
        super().__init__(folder, tokenizer=tok, threads=threads, context=min(context or model_ctx, model_ctx),
                         model_bytes=size)
        from safetensors.numpy import load_file

        arrays = load_file(str(folder / PARAMS_FILE))
        missing = [n for n in names if n not in arrays]
        if missing:
            raise EdgelmError(f"{folder}/{PARAMS_FILE} lacks {missing[0]} (and {len(missing) - 1} more); re-export")
        self._session = Session(lib_path, self.tvm_config, arrays, self.context)

    def _check_fits(self, held: int, ids: Sequence[int]) -> None:
        """Refuse ``ids`` on top of ``held`` cached tokens when they pass the compiled context."""
        if held + len(ids) > self.context:
            raise EdgelmError(f"{held + len(ids)} tokens exceed the context of {self.context}")

    def _prefill(self, ids: Sequence[int], max_new_tokens: int = 0) -> "np.ndarray":
        self._check_fits(0, ids)
        return self._session.prefill(ids)[-1][0, -1].astype("float32")  # [V]

    def _rewind(self, n: int) -> bool:
        self._session.rewind(n)
        return True

    def _extend(self, ids: Sequence[int]) -> "np.ndarray":
        self._check_fits(self._session.length, ids)
        return self._session.extend(list(ids))[-1][0, -1].astype("float32")  # [V]

    def _step(self, token: int) -> "np.ndarray":
        self._check_fits(self._session.length, [token])
        return self._session.forward("decode", [token])[0, -1].astype("float32")  # [V]

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        self._check_fits(0, ids)
        self._held = []
        parts = self._session.prefill(ids, "prefill_all")
        return np.concatenate([p[0] for p in parts]).astype(np.float32)  # [T, V]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "arch": self.tvm_config.get("arch"), "tuned": bool(self.tvm_config.get("tuning"))}

    def _close(self) -> None:
        self._session.close()


def _set_threads(tvm, threads: int) -> None:
    """TVM's pool caps itself at TVM_NUM_THREADS, else at half the logical CPUs on x86 (it assumes
    hyperthreads): on 2 vCPUs that is 1 thread, whatever is asked. So the cap is raised first."""
    import os

    os.environ["TVM_NUM_THREADS"] = str(max(threads, int(os.environ.get("TVM_NUM_THREADS", "0") or 0)))
    tvm.get_global_func("runtime.config_threadpool")(-3, threads)  # -3: every thread may run on every core
    got = tvm.get_global_func("runtime.NumThreads")()
    if got != threads:
        log.warning("tvm: asked for %d threads, its pool runs %d", threads, got)


def _check_library(lib: Path, cfg: dict[str, Any], tvm_version: str) -> None:
    """Refuse, in one line, a library this machine or this TVM can't run."""
    from edgelm.converters.tvm import ARCHES, elf_machine, host_arch, host_features

    if not lib.is_file():
        raise EdgelmError(f"{lib} is missing; re-export the artifact")
    built = cfg.get("tvm")
    if built != tvm_version:
        raise EdgelmError(f"{lib} was built with TVM {built}, this is TVM {tvm_version}; re-export it with this TVM "
                          "(or install that version)")
    host = ARCHES.get(host_arch())
    machine = elf_machine(lib)
    if host is None or machine != host.e_machine:
        arch = next((a.name for a in ARCHES.values() if a.e_machine == machine), f"ELF machine {machine}")
        raise EdgelmError(f"{lib} is built for {arch}, this machine is {host_arch()}; run it on an {arch} device, or "
                          f"re-export with --arch {host_arch()}")
    if cfg.get("arch") == host_arch() == "x86-64":  # a native build uses this machine's vector features
        missing = sorted(set(cfg.get("mattr", [])) - set(host.mattr) - set(host_features()))
        if missing:
            raise EdgelmError(f"{lib} was compiled for a CPU with {', '.join(m.lstrip('+') for m in missing)}, which "
                              f"this CPU lacks (it would stop on an illegal instruction); re-export it on this machine")
