"""Where `edgelm bench` rows run: ``--device SPEC``, one registered :class:`BenchDevice` per scheme.

    local                       this machine, one process per row (the default)
    ssh://[USER@]HOST[:PORT]    a board or phone with sshd: artifacts and a runner pushed, run there, results pulled
    qemu-aarch64                the aarch64 runners under qemu-user on this machine (emulation, not a device's speed)
    rpc://HOST:PORT             a TVM RPC server: the TVM library uploaded, prefill and decode timed remotely
    browser[:PORT]              any browser that opens the bench page (a phone's, on the LAN)

Every device returns the same rows (``ROW_FIELDS``); what a device cannot measure stays empty, and the row's
``notes`` say why.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgelm.bench.config import BenchConfig
from edgelm.errors import EdgelmError
from edgelm.registry import DEVICES

log = logging.getLogger(__name__)


def scheme_of(spec: str) -> str:
    """``ssh://pi@host`` -> ssh, ``browser:8765`` -> browser, ``local`` -> local."""
    return spec.split("://", 1)[0] if "://" in spec else spec.split(":", 1)[0]


def open_device(config: BenchConfig) -> BenchDevice:
    name = scheme_of(config.device)
    if name not in DEVICES:
        raise EdgelmError(f"--device {config.device!r}: unknown device kind {name!r}; use one of "
                          + ", ".join(DEVICES.names()) + " (edgelm bench --help)")
    return DEVICES.get(name).open(config)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class BenchDevice:
    """A place bench rows run. ``open`` parses the spec and connects (one-line errors); ``check`` refuses rows it
    cannot run before anything runs; ``run`` returns one row per spec (the browser: per spec and browser)."""

    name = ""  # the --device scheme
    formats: tuple[str, ...] = ()  # artifact formats it runs

    @classmethod
    def open(cls, config: BenchConfig) -> BenchDevice:
        raise NotImplementedError

    def check(self, specs: list[dict[str, Any]]) -> None:
        for s in specs:
            if not s.get("error") and s.get("format") not in self.formats:
                raise EdgelmError(f"{s['path']} is a {s.get('format')} model; --device {self.name} runs "
                                  f"{', '.join(self.formats)} artifacts")

    def run(self, specs: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
        raise NotImplementedError

    def facts(self) -> list[dict[str, Any]]:
        """The devices' own facts for the JSON header, each with the ``id`` its rows carry."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> BenchDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def artifact_prompt(folder: str | Path, config: BenchConfig) -> list[int]:
    """The row's prompt ids for a device that runs no edgelm: the split's first ``prompt_len`` tokens, in the
    artifact's own tokenizer (the same text every local row reads)."""
    from edgelm.bench.worker import prompt_ids
    from edgelm.runtimes.text import TextTokenizer

    class _Encoder:  # what prompt_ids needs of a runtime
        encode = TextTokenizer.from_folder(Path(folder)).encode

    return prompt_ids(_Encoder, tuple(config.data), config.split, config.prompt_len)


def timed_row(n_prompt: int, gen_len: int, r: dict[str, Any]) -> dict[str, Any]:
    """Row figures from a runner's seconds (runtimes/tvm_greedy.py's bench): per run prefill_s, ttft_s, decode_s,
    and sustained_decode_s; the same arithmetic as a local row's (edgelm.metrics)."""
    from edgelm.metrics import mean_std, tokens_per_second

    row: dict[str, Any] = {"threads": r["threads"], "load_s": r["load_s"]}
    for key, vals in (("pp_tps", [tokens_per_second(n_prompt, t) for t in r["prefill_s"]]),
                      ("tg_tps", [tokens_per_second(gen_len - 1, t) for t in r["decode_s"]]),
                      ("ttft_ms", [t * 1e3 for t in r["ttft_s"]])):
        ms = mean_std(vals)
        row[f"{key}_mean"], row[f"{key}_std"] = ms.mean, ms.std
    row["tg_tps_runs"] = [tokens_per_second(gen_len - 1, t) for t in r["sustained_decode_s"]] or None
    return row


def progress_bar(specs: list[Any], config: BenchConfig, desc: str = "bench", unit: str = "row"):
    from tqdm import tqdm

    return tqdm(specs, desc=desc, unit=unit, disable=not config.progress, file=sys.stderr, dynamic_ncols=True)


@DEVICES.register
class LocalDevice(BenchDevice):
    """This machine: each row in a fresh process (edgelm.bench.worker), on any runtime edgelm has."""

    name = "local"
    formats = ("gguf", "onnx", "tvm", "hf")

    @classmethod
    def open(cls, config: BenchConfig) -> LocalDevice:
        if config.device != "local":
            raise EdgelmError(f"--device {config.device!r}: this machine is plain 'local'")
        return cls()

    def facts(self) -> list[dict[str, Any]]:
        from edgelm.bench.api import machine_info

        m = machine_info()
        return [{"id": "local", "kind": "local", **{k: m[k] for k in ("machine", "system", "cpu", "logical_cores",
                                                                         "physical_cores", "memory_bytes")}}]

    def run(self, specs: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
        from edgelm.bench.api import _run_worker

        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="edgelm-bench-") as tmp:
            work = Path(tmp)
            refs: dict[str, str | dict] = {}
            if config.quality:
                for ref in sorted({s["reference"] for s in specs if not s.get("error") and s.get("reference")}):
                    d = work / f"ref-{len(refs)}"
                    d.mkdir()
                    log.info("reference logits: %s (%d x %d tokens, %s split)", ref, config.eval_seqs,
                             config.eval_seqlen, config.split)
                    res = _run_worker({"kind": "reference", "model": ref, "data": list(config.data),
                                       "split": config.split, "seqs": config.eval_seqs, "out": str(d),
                                       "seqlen": config.eval_seqlen}, work, config.timeout)
                    refs[ref] = res if "error" in res else str(d)
            bar = progress_bar(specs, config)
            for s in bar:
                row = dict(s, device="local")
                if s.get("error"):
                    rows.append(row)
                    continue
                bar.set_description(f"{s['model']} / {s['runtime']} / {s['threads'] or 'auto'} thr")
                spec = {"model": s["path"], "runtime": s["runtime"], "threads": s["threads"],
                        "data": list(config.data), "split": config.split, "prompt_len": config.prompt_len,
                        "gen_len": config.gen_len, "repeat": config.repeat, "overhead": config.overhead,
                        "sustained": config.sustained}
                ref = refs.get(s.get("reference") or "")
                if config.quality and isinstance(ref, str):
                    spec["reference_dir"] = ref
                row["test_time"] = utc_now()
                res = _run_worker(spec, work, config.timeout)
                if config.quality and isinstance(ref, dict) and "error" not in res:
                    res["error"] = f"quality skipped: reference {s.get('reference')} failed: {ref['error']}"
                elif config.quality and ref is None and "error" not in res:
                    res["error"] = "quality skipped: no reference in the manifest; pass --reference"
                row.update(res)
                rows.append(row)
            bar.close()
        return rows

