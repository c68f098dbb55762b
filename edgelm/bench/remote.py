"""Devices reached through a shell: ``ssh://[USER@]HOST[:PORT]`` (a Raspberry Pi, a Jetson, a phone in Termux) and
``qemu-aarch64`` (the same runners under qemu-user here: emulation, for checking a build, not a device's speed).

GGUF rows run llama.cpp's own ``llama-bench``, built by ``make llama-bench`` from the llama.cpp that
llama-cpp-python vendors (the runtime's commit), for x86_64 and for aarch64 (static). Edgelm pushes the runner and
the model into a cache on the device, named by content (a second run pushes nothing), runs one llama-bench per row
while it reads the process's peak RSS (VmHWM), and pulls back llama-bench's JSON. Only POSIX sh, cat and the
coreutils are needed on the device: no Python, no scp.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.bench.config import BenchConfig
from edgelm.bench.devices import BenchDevice, artifact_prompt, progress_bar, timed_row, utc_now
from edgelm.errors import EdgelmError
from edgelm.registry import DEVICES

log = logging.getLogger(__name__)

ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
# what the device prints about itself; one key=value per line (thermal: one line per zone, type:millidegrees)
PROBE = r"""
echo "arch=$(uname -m)"
echo "system=$(uname -sr)"
echo "cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc)"
cpu=$(grep -m1 -E '^(model name|Model|Hardware)[[:space:]]*:' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)
[ -z "$cpu" ] && cpu=$(lscpu 2>/dev/null | grep -m1 'Model name' | cut -d: -f2-)
echo "cpu=$cpu"
echo "mem_kb=$(grep MemTotal /proc/meminfo 2>/dev/null | tr -s ' ' | cut -d' ' -f2)"
for z in /sys/class/thermal/thermal_zone*; do
  [ -r "$z/temp" ] && echo "thermal=$(cat "$z/type" 2>/dev/null):$(cat "$z/temp")"
done
echo "home=$HOME"
"""


def runner_binary(arch: str) -> Path | None:
    """llama-bench built for ``arch`` (make llama-bench puts llama-bench-ARCH beside the venv's python)."""
    name = f"llama-bench-{arch}"
    for p in (Path(sys.prefix) / "bin" / name, Path(shutil.which(name) or "")):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


class Shell:
    """Runs sh scripts on the device; ``exec_prefix`` goes before the runner (qemu-user's, when emulated)."""

    label = ""
    exec_prefix = ""

    def run(self, script: str, *, stdin: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def check(self, script: str, what: str, timeout: float = 600, stdin: Path | None = None) -> str:
        """``script``'s stdout; a one-line error naming ``what`` failed otherwise."""
        try:
            r = self.run(script, stdin=stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgelmError(f"{self.label}: {what} took over {timeout:.0f} s; is the device still reachable?") from None
        if r.returncode != 0:
            raise EdgelmError(f"{self.label}: {what} failed: {self.reason(r)}")
        return r.stdout.decode(errors="replace")

    def reason(self, r: subprocess.CompletedProcess) -> str:
        lines = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip()[:300] if lines else f"exit status {r.returncode}"


class SshShell(Shell):
    """OpenSSH's client, non-interactive (BatchMode: a key or an agent, never a password prompt)."""

    def __init__(self, spec: str, config: BenchConfig) -> None:
        m = re.fullmatch(r"ssh://(?:([^@/:]+)@)?(\[[^\]]+\]|[^@/:]+)(?::(\d+))?/?", spec)
        if not m:
            raise EdgelmError(f"--device {spec!r}: write ssh://[USER@]HOST[:PORT], e.g. ssh://pi@192.168.1.20 or "
                              "ssh://u0_a123@phone:8022 (Termux's sshd)")
        user, host, port = m.groups()
        if config.ssh_config and not Path(config.ssh_config).is_file():
            raise EdgelmError(f"--ssh-config {config.ssh_config}: no such file")
        self.label = spec
        self.cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(min(config.wait, 60)))}",
                    "-o", "ServerAliveInterval=15", "-T"]
        self.cmd += ["-F", config.ssh_config] if config.ssh_config else []
        self.cmd += ["-p", port] if port else []
        self.cmd += [f"{user}@{host}" if user else host.strip("[]")]

    def run(self, script: str, *, stdin: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
            return subprocess.run([*self.cmd, "sh -c " + shlex.quote(script)], stdin=f, capture_output=True,
                                  timeout=timeout)

    def reason(self, r: subprocess.CompletedProcess) -> str:
        why = super().reason(r)
        if r.returncode == 255 and "Permission denied" in why:
            return f"the device refused the key ({why}); add your public key to its ~/.ssh/authorized_keys, or " \
                   "name the key in --ssh-config"
        if r.returncode == 255:
            return f"could not connect ({why}); check the host, the port and that sshd runs there"
        return why


class LocalShell(Shell):
    """sh on this machine, in a folder of its own (the device's home), the runner under an emulator."""

    def __init__(self, label: str, home: Path, exec_prefix: str) -> None:
        self.label, self.home, self.exec_prefix = label, home, exec_prefix

    def run(self, script: str, *, stdin: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
            return subprocess.run(["sh", "-c", script], stdin=f, capture_output=True, timeout=timeout,
                                  env={**os.environ, "HOME": str(self.home)})


@dataclass
class Facts:
    arch: str
    cpu: str
    cores: int | None
    memory_bytes: int | None
    system: str
    home: str
    thermal: list[dict[str, Any]]


def probe(shell: Shell, timeout: float) -> Facts:
    out = shell.check(PROBE, "reading the device's facts (uname, /proc/cpuinfo)", timeout=timeout)
    kv: dict[str, list[str]] = {}
    for line in out.splitlines():
        k, _, v = line.partition("=")
        kv.setdefault(k.strip(), []).append(v.strip())

    def one(k: str) -> str:
        return (kv.get(k) or [""])[0]

    arch = ARCH_ALIASES.get(one("arch"), one("arch"))
    thermal = []
    for t in kv.get("thermal", []):
        kind, _, milli = t.rpartition(":")
        if milli.lstrip("-").isdigit():
            thermal.append({"zone": kind or "?", "celsius": int(milli) / 1000})
    return Facts(arch=arch, cpu=one("cpu") or arch, cores=int(one("cores")) if one("cores").isdigit() else None,
                 memory_bytes=int(one("mem_kb")) * 1024 if one("mem_kb").isdigit() else None, system=one("system"),
                 home=one("home") or ".", thermal=thermal)


# one runner in the background while its VmHWM is read every 0.05 s (the last read is the peak: VmHWM only grows);
# prints the peak, the exit status, the runner's JSON and the tail of its stderr, between markers
RUN = r"""cd {dir} || exit 3
{cmd} > out.json 2> err.log &
pid=$!; hwm=""
while kill -0 $pid 2>/dev/null; do h=$(grep VmHWM /proc/$pid/status 2>/dev/null) && hwm=$h; sleep 0.05; done
wait $pid; rc=$?
echo "@@hwm $hwm"; echo "@@rc $rc"; cat out.json; echo "@@err"; tail -n 5 err.log; rm -f out.json err.log
"""


def parse_run(out: str) -> tuple[int, int | None, Any, str]:
    """(exit status, peak RSS bytes or None, the runner's JSON, its stderr's tail) from RUN's output."""
    hwm = re.search(r"^@@hwm VmHWM:\s*(\d+)\s*kB", out, re.MULTILINE)
    rc = re.search(r"^@@rc (\d+)", out, re.MULTILINE)
    body, _, err = out.partition("@@err")
    body = body[body.find("\n", rc.end()) + 1:] if rc else ""
    try:
        records = json.loads(body) if body.strip() else []
    except ValueError:
        records = []
    return (int(rc.group(1)) if rc else 1), (int(hwm.group(1)) * 1024 if hwm else None), records, err.strip()


class ShellDevice(BenchDevice):
    """Rows on a device reached by a :class:`Shell`: GGUF through llama-bench, TVM through runtimes/tvm_greedy.py
    (``--bench``) under the device's Python with apache-tvm and numpy."""

    formats = ("gguf", "tvm")
    python = "python3"  # the device's Python, for TVM rows

    def __init__(self, shell: Shell, facts: Facts, config: BenchConfig, cache: str) -> None:
        self.shell, self.info, self.config, self.cache = shell, facts, config, cache

    def facts(self) -> list[dict[str, Any]]:
        f = self.info
        return [{"id": self.shell.label, "kind": self.name, "machine": f.arch, "system": f.system, "cpu": f.cpu,
                 "logical_cores": f.cores, "memory_bytes": f.memory_bytes, "thermal": f.thermal,
                 **({"emulated": True} if self.shell.exec_prefix else {})}]

    def check(self, specs: list[dict[str, Any]]) -> None:
        from edgelm.converters.tvm import ARCHES, elf_machine

        super().check(specs)
        live = [s for s in specs if not s.get("error")]
        if any(s["format"] == "gguf" for s in live) and runner_binary(self.info.arch) is None:
            raise EdgelmError(f"{self.shell.label} is {self.info.arch} and there is no llama-bench-{self.info.arch} "
                              "here; build it with `make llama-bench` (x86_64 and aarch64)")
        bad = [s for s in live if s.get("runtime") != {"gguf": "llamacpp", "tvm": "tvm"}[s["format"]]]
        if bad:
            raise EdgelmError(f"--device {self.name} runs GGUF through llama-bench and TVM through its runtime; drop "
                              f"--runtimes {bad[0]['runtime']}")
        tvm_rows = [s for s in live if s["format"] == "tvm"]
        for s in tvm_rows:  # a library for another CPU is refused here, before anything is pushed
            machine = elf_machine(Path(s["path"]) / "model.so")
            arch = next((a.name for a in ARCHES.values() if a.e_machine == machine), f"ELF machine {machine}")
            if arch.replace("-", "_") != self.info.arch:
                raise EdgelmError(f"{s['path']} is built for {arch} and {self.shell.label} is {self.info.arch}; "
                                  f"export it with --arch {self.info.arch.replace('_', '-')}")
        if tvm_rows:
            out = self.shell.run(f"{self.python} -c 'import numpy, tvm; print(tvm.__version__)'", timeout=600)
            have = out.stdout.decode(errors="replace").strip() if out.returncode == 0 else None
            want = json.loads((Path(tvm_rows[0]["path"]) / "tvm_config.json").read_text()).get("tvm")
            if have is None:
                raise EdgelmError(f"{self.shell.label}: TVM rows run under the device's {self.python.split()[-1]}, "
                                  f"which cannot import tvm and numpy; pip install apache-tvm=={want} numpy there")
            if have != want:
                raise EdgelmError(f"{tvm_rows[0]['path']} was built with TVM {want} and {self.shell.label} has TVM "
                                  f"{have}; install apache-tvm=={want} there")

    def _files(self, s: dict[str, Any]) -> list[Path]:
        """What a row needs on the device; the first is the model (GGUF: the file; TVM: the library)."""
        p = Path(s["path"])
        if s["format"] == "tvm":
            return [p / "model.so", p / "params.safetensors", p / "tvm_config.json"]
        return [p if p.is_file() else p / "model.gguf"]

    def _key(self, files: list[Path]) -> str:
        """The cache folder of files that belong together: named by their contents."""
        from edgelm.fsutil import sha256_file

        h = hashlib.sha256()
        for f in files:
            h.update(sha256_file(f).encode())  # cached by the file's identity: a rerun does not read it again
        return h.hexdigest()[:16]

    def push(self, groups: list[list[Path]]) -> dict[Path, str]:
        """Each group of files into ``cache/KEY/`` on the device unless already there; their device paths."""
        names = {f: f"{self.cache}/{self._key(g)}/{f.name}" for g in groups for f in g}
        listing = self.shell.check(" ".join(f"[ -f {shlex.quote(p)} ] && echo {shlex.quote(p)};"
                                            for p in names.values()) + " true", "looking for cached files")
        have = set(listing.split())
        todo = [f for f, p in names.items() if p not in have]
        need = sum(f.stat().st_size for f in todo)
        if need:
            q = shlex.quote(self.cache)
            df = self.shell.check(f"mkdir -p {q} && df -Pk {q} | tail -n 1", "reading free space")
            free = int(df.split()[3]) * 1024 if len(df.split()) > 3 and df.split()[3].isdigit() else None
            if free is not None and free < need * 1.05 + (16 << 20):
                raise EdgelmError(f"{self.shell.label} has {free / 2**20:.1f} MiB free under {self.cache} but the "
                                  f"runner and artifacts need {need / 2**20:.1f} MiB; free space on the device")
        for f in progress_bar(todo, self.config, desc="push", unit="file"):
            dest = names[f]
            # .part then mv: an interrupted push never leaves a file that looks complete
            self.shell.check(f"mkdir -p {shlex.quote(str(Path(dest).parent))} && cat > {shlex.quote(dest)}.part && "
                             f"chmod +x {shlex.quote(dest)}.part && mv {shlex.quote(dest)}.part {shlex.quote(dest)}",
                             f"pushing {f.name} ({f.stat().st_size / 2**20:.1f} MiB)", timeout=3600, stdin=f)
        return names

    def run(self, specs: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
        from edgelm.runtimes import tvm_greedy

        live = [s for s in specs if not s.get("error")]
        runners = []
        if any(s["format"] == "gguf" for s in live):
            runners.append([runner_binary(self.info.arch)])
        if any(s["format"] == "tvm" for s in live):
            runners.append([Path(tvm_greedy.__file__)])
        where = self.push([*runners, *(self._files(s) for s in live)])
        rows: list[dict[str, Any]] = []
        bar = progress_bar(specs, config)
        for s in bar:
            row = dict(s, device=self.shell.label)
            if s.get("error"):
                rows.append(row)
                continue
            files = self._files(s)
            threads = s.get("threads")  # None: the runner's own pick (llama-bench: the physical cores)
            bar.set_description(f"{s['model']} / {s['format']} / {threads or 'auto'} thr")
            row.update(size_bytes=sum(f.stat().st_size for f in files if f.suffix != ".json"), test_time=utc_now())
            try:
                if s["format"] == "tvm":
                    row.update(self._tvm_row(where[Path(tvm_greedy.__file__)], where[files[0]], s, threads, config))
                else:
                    row.update(self._gguf_row(where[runners[0][0]], where[files[0]], threads, config))
            except _RowFailed as e:
                row["error"] = str(e)
            rows.append(row)
        bar.close()
        return rows

    def _run(self, where: str, cmd: str, timeout: float, what: str) -> tuple[int | None, Any]:
        """``cmd`` in the device folder ``where``: (peak RSS, its JSON output); _RowFailed with the reason."""
        try:
            r = self.shell.run(RUN.format(dir=shlex.quote(where), cmd=cmd), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise _RowFailed(f"timed out after {timeout:.0f} s (--timeout)") from None
        if r.returncode != 0:
            raise _RowFailed(self.shell.reason(r))
        rc, hwm, records, err = parse_run(r.stdout.decode(errors="replace"))
        if rc != 0 or not records:
            raise _RowFailed(f"{what} exited {rc}: {err.splitlines()[-1] if err else 'no output'}")
        return hwm, records

    def _llama_bench(self, runner: str, model: str, args: str, timeout: float) -> tuple[int | None, list[dict]]:
        cmd = f"{self.shell.exec_prefix}./{Path(runner).name} -m {shlex.quote(model)} {args} -o json"
        return self._run(str(Path(runner).parent), cmd, timeout, "llama-bench")

    def _tvm_row(self, runner: str, lib: str, s: dict[str, Any], threads: int | None,
                 config: BenchConfig) -> dict[str, Any]:
        ids = artifact_prompt(s["path"], config)
        n = threads or self.info.cores or 1
        cmd = (f"{self.python} {shlex.quote(runner)} --bench {shlex.quote(str(Path(lib).parent))} "
               f"{','.join(map(str, ids))} {config.gen_len} {config.repeat} {config.sustained} {n}")
        hwm, r = self._run(str(Path(lib).parent), cmd, config.timeout, "the TVM runner")
        out = {"runtime": "tvm", "peak_rss_bytes": hwm, **timed_row(len(ids), config.gen_len, r)}
        notes = [f"TVM {r['tvm']} runtime under the device's Python (runtimes/tvm_greedy.py --bench)"]
        if self.shell.exec_prefix:
            notes.append("emulated: qemu-user on this machine, not the device's speed; RSS includes the emulator")
        out["notes"] = "; ".join(notes)
        return out

    def _gguf_row(self, runner: str, model: str, threads: int | None, config: BenchConfig) -> dict[str, Any]:
        # prefill from an empty context, decode after the prompt (llama-bench -d: the depth its tests start at), as
        # edgelm's own rows measure them; llama-bench's plain tg test would decode from an empty context
        t = f" -t {threads}" if threads else ""
        p, g = config.prompt_len, config.gen_len
        hwm, records = self._llama_bench(runner, model, f"-p {p} -n {g} -d 0,{p} -r {config.repeat}{t}",
                                         config.timeout)
        runs = None
        if config.sustained:
            _, sus = self._llama_bench(runner, model, f"-p 0 -n {g} -d {p} -r {config.sustained}{t}",
                                       config.timeout)
            runs = next((r.get("samples_ts") for r in sus if r.get("n_gen")), None)
        pp = next((r for r in records if r.get("n_prompt") and not r.get("n_gen") and not r.get("n_depth")), {})
        tg = next((r for r in records if r.get("n_gen") and not r.get("n_prompt") and r.get("n_depth") == p), {})
        first = records[0]
        notes = [f"llama.cpp's llama-bench ({first.get('build_commit', '?')}): prefill at depth 0, decode at depth "
                 f"{p} (-d); load_s and TTFT: it times prefill and decode apart, not the load or the first token"]
        if self.shell.exec_prefix:
            notes.append("emulated: qemu-user on this machine, not the device's speed; RSS includes the emulator")
        return {"runtime": "llama-bench", "pp_tps_mean": pp.get("avg_ts"), "pp_tps_std": pp.get("stddev_ts"),
                "tg_tps_mean": tg.get("avg_ts"), "tg_tps_std": tg.get("stddev_ts"), "peak_rss_bytes": hwm,
                "tg_tps_runs": runs, "threads": first.get("n_threads"), "cpu_info": first.get("cpu_info"),
                "notes": "; ".join(notes)}


class _RowFailed(Exception):
    pass


@DEVICES.register
class SshDevice(ShellDevice):
    """``ssh://[USER@]HOST[:PORT]``: any Linux with sshd (Termux's on a phone)."""

    name = "ssh"

    @classmethod
    def open(cls, config: BenchConfig) -> SshDevice:
        shell = SshShell(config.device, config)
        facts = probe(shell, timeout=config.wait)
        dev = cls(shell, facts, config, config.remote_dir or f"{facts.home.rstrip('/')}/.cache/edgelm-bench")
        dev.python = config.device_python
        return dev


@DEVICES.register
class QemuDevice(ShellDevice):
    """``qemu-aarch64``: the aarch64 runner under qemu-user on this machine (Debian's qemu-user-static), for
    checking an aarch64 build before a board is at hand. The rows are emulation, never a device's speed."""

    name = "qemu-aarch64"

    @classmethod
    def open(cls, config: BenchConfig) -> QemuDevice:
        import tempfile

        if config.device != cls.name:
            raise EdgelmError(f"--device {config.device!r}: write qemu-aarch64")
        qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        if not qemu:
            raise EdgelmError("--device qemu-aarch64 needs qemu-user: apt-get install qemu-user-static")
        home = Path(tempfile.mkdtemp(prefix="edgelm-qemu-"))
        shell = LocalShell(cls.name, home, exec_prefix=f"{shlex.quote(qemu)} ")
        facts = probe(shell, timeout=config.wait)
        facts.arch, facts.cpu = "aarch64", f"{Path(qemu).name} on {facts.cpu}"
        dev = cls(shell, facts, config, str(home / "cache"))
        dev.home = home
        root = Path(config.qemu_root).resolve()  # qemu -L: the root's files first (its stdlib, its wheels)
        dev.python = f"{shlex.quote(qemu)} -L {shlex.quote(str(root))} {shlex.quote(str(root / 'usr/bin/python3.11'))}"
        return dev

    def close(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
