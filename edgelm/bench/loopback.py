"""Throwaway devices on 127.0.0.1, for trying `edgelm bench --device` without hardware and for its tests and
benchmarks: an OpenSSH server that accepts one fresh key (Debian's openssh-server), and a TVM RPC server, native or
under qemu-aarch64 in an arm64 root. Each listens on loopback only, on a free port, and stops with ``stop()``."""
from __future__ import annotations

import getpass
import subprocess
import time
from pathlib import Path

from edgelm.errors import EdgelmError
from edgelm.netutil import free_port, stop_process

SSHD = "/usr/sbin/sshd"
RPC_SERVER = Path(__file__).with_name("rpc_server.py")


class LoopbackSshd:
    """sshd on 127.0.0.1 accepting the key ``folder/user`` (and refusing ``folder/stranger``); ``spec`` is the
    --device, ``config`` the --ssh-config that uses the key, ``stranger`` one with a key it refuses."""

    def __init__(self, folder: str | Path, timeout: float = 30) -> None:
        d = self.folder = Path(folder)
        if not Path(SSHD).is_file():
            raise EdgelmError(f"{SSHD} is missing; apt-get install openssh-server (make sshd)")
        d.mkdir(parents=True, exist_ok=True)
        for name in ("host", "user", "stranger"):
            if not (d / name).is_file():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        (d / "authorized_keys").write_text((d / "user.pub").read_text())
        self.port = free_port()
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile "
            f"{d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        with open(d / "sshd.log", "w") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
        for key in ("user", "stranger"):
            (d / f"config-{key}").write_text(f"Host 127.0.0.1\n  IdentityFile {d / key}\n  IdentitiesOnly yes\n"
                                             f"  UserKnownHostsFile {d / 'known_hosts'}\n"
                                             "  StrictHostKeyChecking accept-new\n")
        self.user = getpass.getuser()
        self.spec = f"ssh://{self.user}@127.0.0.1:{self.port}"
        self.config, self.stranger = str(d / "config-user"), str(d / "config-stranger")
        end = time.monotonic() + timeout
        while subprocess.run(["ssh", "-F", self.config, "-p", str(self.port), "-o", "BatchMode=yes",
                              f"{self.user}@127.0.0.1", "true"], capture_output=True, check=False).returncode:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise EdgelmError(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        stop_process(self.proc, 30)

    def __enter__(self) -> "LoopbackSshd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoopbackRpc:
    """A TVM RPC server on 127.0.0.1 run by ``python`` (a command: ``[sys.executable]``, or qemu-aarch64-static -L
    ROOT ROOT/usr/bin/python3.11 for an emulated aarch64 device); ``spec`` is the --device."""

    def __init__(self, python: list[str], timeout: float = 180) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([*python, str(RPC_SERVER), str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + timeout  # python and tvm under qemu take a while to import
        line = ""
        while "ready" not in line:
            line = self.proc.stdout.readline()
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise EdgelmError(f"the TVM RPC server did not start: {self.proc.stderr.read()[-500:]}")
        self.spec = f"rpc://127.0.0.1:{self.port}"

    @classmethod
    def qemu_aarch64(cls, root: str | Path) -> "LoopbackRpc":
        import shutil

        root = Path(root).resolve()
        qemu = shutil.which("qemu-aarch64-static")
        if not qemu or not (root / "usr/bin/python3.11").is_file():
            raise EdgelmError("an emulated aarch64 RPC server needs qemu-user-static and the arm64 root "
                              "(make tvm-aarch64)")
        return cls([qemu, "-L", str(root), str(root / "usr/bin/python3.11")])

    def stop(self) -> None:
        stop_process(self.proc, 30, kill=True)

    def __enter__(self) -> "LoopbackRpc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
