"""``edgelm bench --device rpc://HOST:PORT``: TVM's own remote path (what MLC uses for phones). The TVM artifact's
library is uploaded to a TVM RPC server (``python -m tvm.exec.rpc_server`` on a board, TVM's RPC app on a phone),
its params copied to the device, and prefill and decode timed from here through the same Session the local TVM
runtime drives (runtimes/tvm_greedy.py)."""
from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Any

from edgelm.bench.config import BenchConfig
from edgelm.bench.devices import BenchDevice, artifact_prompt, progress_bar, timed_row, utc_now
from edgelm.errors import EdgelmError
from edgelm.registry import DEVICES

log = logging.getLogger(__name__)

NOTES = ("decode timed from here: every step's RPC calls are in it, and each step feeds the first token back instead "
         "of reading the logits over the link; load_s includes uploading the library and params; peak RSS: TVM's RPC "
         "does not report it")


@DEVICES.register
class RpcDevice(BenchDevice):
    name = "rpc"
    formats = ("tvm",)

    def __init__(self, spec: str, session: Any, triple: str | None) -> None:
        self.spec, self.session, self.triple = spec, session, triple
        self.arch = (triple or "").split("-")[0] or None

    @classmethod
    def open(cls, config: BenchConfig) -> "RpcDevice":
        m = re.fullmatch(r"rpc://([^:/]+):(\d+)/?", config.device)
        if not m:
            raise EdgelmError(f"--device {config.device!r}: write rpc://HOST:PORT, the address of a TVM RPC server "
                              "(python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090 on the device)")
        host, port = m.group(1), int(m.group(2))
        try:  # a plain connect first: TVM's own retries for a minute before it says anything
            socket.create_connection((host, port), timeout=min(config.wait, 10)).close()
        except OSError as e:
            raise EdgelmError(f"could not connect to the TVM RPC server at {host}:{port} ({e.strerror or e}); start "
                              "one there: python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT") from None
        from tvm import rpc

        try:
            session = rpc.connect(host, port, session_timeout=0)
        except Exception as e:  # noqa: BLE001 - TVM raises plain errors; one line with the reason
            raise EdgelmError(f"{host}:{port} is not a TVM RPC server that answers "
                              f"({str(e).splitlines()[-1][:200]})") from None
        try:
            triple = str(session.get_function("target.llvm_get_system_triple")())
        except Exception:  # noqa: BLE001 - a runtime-only server (a phone's RPC app) has no LLVM to ask
            triple = None
        return cls(config.device, session, triple)

    def facts(self) -> list[dict[str, Any]]:
        return [{"id": self.spec, "kind": self.name, "machine": self.arch, "triple": self.triple,
                 "notes": "TVM's RPC tells the target triple only (where the server has LLVM)"}]

    def check(self, specs: list[dict[str, Any]]) -> None:
        from edgelm.converters.tvm import ARCHES, elf_machine

        super().check(specs)
        for s in specs:
            if s.get("error"):
                continue
            if s.get("runtime") != "tvm":
                raise EdgelmError(f"--device rpc runs TVM artifacts through TVM's runtime; drop --runtimes "
                                  f"{s['runtime']}")
            machine = elf_machine(Path(s["path"]) / "model.so")
            arch = next((a.name for a in ARCHES.values() if a.e_machine == machine), f"ELF machine {machine}")
            if self.arch and arch.replace("-", "_") != self.arch:
                raise EdgelmError(f"{s['path']} is built for {arch} and {self.spec} is {self.arch}; export it with "
                                  f"--arch {self.arch.replace('_', '-')}")

    def run(self, specs: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
        from edgelm.runtimes import tvm_greedy

        rows = []
        bar = progress_bar(specs, config)
        for s in bar:
            row = dict(s, device=self.spec)
            if s.get("error"):
                rows.append(row)
                continue
            folder = Path(s["path"])
            threads = s.get("threads") or 1
            bar.set_description(f"{s['model']} / tvm over rpc / {threads} thr")
            ids = artifact_prompt(folder, config)
            row.update(test_time=utc_now(), runtime="tvm",
                       size_bytes=sum((folder / f).stat().st_size for f in ("model.so", "params.safetensors")))
            try:
                r = tvm_greedy.bench(folder, ids, config.gen_len, config.repeat, config.sustained, threads,
                                     remote=self.session)
            except Exception as e:  # noqa: BLE001 - the device's failure is this row's error, the others still run
                row["error"] = f"the device failed: {str(e).strip().splitlines()[-1][:300]}"
                rows.append(row)
                continue
            row.update(timed_row(len(ids), config.gen_len, r), notes=NOTES)
            rows.append(row)
        bar.close()
        return rows

    def close(self) -> None:
        self.session = None
