"""Untrusted Python (a model's answer, with the tests it must pass) run in a child process: its own empty folder, a
time, CPU, memory and file-size limit, and no network.

The network goes two ways: where the kernel lets an unprivileged user make namespaces (``unshare -rn``), the child
runs in a network namespace of its own, which has no interface but a loopback that is down; everywhere, a prelude
makes every socket call raise before the program runs. The interpreter starts isolated (``-I -S``: no user site,
no environment variables, no site-packages), so an answer can import the standard library only, as HumanEval's
problems and the corpus's functions need. This is the isolation HumanEval's own ``execution.py`` asks for, in a
process of its own; it is not a security boundary against a determined attacker.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


# runs before the program: no socket can be made or resolved, and os.system, fork, exec* and kill raise
# (subprocess still starts children; they share the process group the timeout kills, and the limits)
PRELUDE = '''\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the edgelm sandbox")
for _n in ("socket", "create_connection", "getaddrinfo", "socketpair", "fromfd", "create_server"):
    setattr(_s, _n, _no_network)
import os as _os
for _n in ("system", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "kill", "killpg", "putenv"):
    if hasattr(_os, _n):
        setattr(_os, _n, _no_network)
del _s, _os, _n
'''


MAX_OUTPUT = 1 << 16


@dataclass(frozen=True)
class RunResult:
    ok: bool  # exited with status 0 within the time limit
    timed_out: bool  # killed at the time limit
    detail: str  # the last line of stderr (why it failed), or "" when it passed
    stdout: str = ""  # what it printed (at most MAX_OUTPUT characters)


@functools.lru_cache(maxsize=1)
def network_namespace() -> bool:
    """Whether ``unshare -rn`` works here (user namespaces allowed); checked once."""
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(cpu_s: int, memory_bytes: int) -> None:
    import resource

    os.setsid()  # its own process group: a timeout kills what it started too
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))  # 16 MiB per file written
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, *, timeout: float = 10.0, memory_mib: int = 1024) -> RunResult:
    """Run ``program`` (Python source) in the sandbox; ok when it exits 0 within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="edgelm-sandbox-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(PRELUDE + "\n" + program)
        cmd = [sys.executable, "-I", "-S", "-B", path]
        if network_namespace():
            cmd = ["unshare", "-rn", *cmd]
        proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                preexec_fn=functools.partial(_limits, int(timeout) + 1, memory_mib << 20))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its group (_limits made it a session leader)
            except ProcessLookupError:
                pass
            proc.communicate()
            return RunResult(False, True, f"timed out after {timeout:g} s")
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    printed = out.decode("utf-8", "replace")[:MAX_OUTPUT]
    if proc.returncode == 0:
        return RunResult(True, False, "", printed)
    return RunResult(False, False, lines[-1][:300] if lines else f"exit {proc.returncode}", printed)
