"""Options of `edgelm bench`; each field becomes a CLI flag, its comment the help text."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgelm.errors import EdgelmError


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = ()  # artifact folders, HF folders or .gguf files
    runtimes: tuple[str, ...] = ()  # runtimes to compare (each model on each one that opens it; default: its own)
    threads: tuple[int, ...] = ()  # thread counts to sweep (default: each runtime's own pick)
    prompt_len: int = 128  # prompt tokens for prefill (pp), from the stdlib test split
    gen_len: int = 64  # generated tokens for decode (tg); end-of-sequence is masked so every run makes them all
    repeat: int = 3  # measured runs per row, after one warm-up
    quality: bool = False  # also perplexity, KLD and top-1 agreement against --reference on the eval text
    reference: str = ""  # reference model for --quality (default: the fp32 model in each artifact's manifest)
    data: tuple[str, ...] = ()  # eval text for prompts and --quality: files, folders, globs (default: stdlib source)
    split: str = "test"  # corpus split the prompts and --quality sequences come from
    eval_seqs: int = 8  # sequences for --quality
    eval_seqlen: int = 128  # tokens per --quality sequence
    overhead: bool = False  # also time the backend's bare greedy loop, to measure edgelm's per-token overhead
    json: str = ""  # write the results as JSON (schema: docs/bench_schema.md)
    csv: str = ""  # write the rows as CSV
    plot: str = ""  # write a plot: decode tok/s against size (and against ΔPPL with --quality)
    timeout: float = 1800.0  # seconds one row may take before it is reported as failed
    device: str = "local"  # where the rows run: local, browser[:PORT], ssh://[USER@]HOST[:PORT], qemu-aarch64, rpc://HOST:PORT
    sustained: int = 0  # also decode N times in a row and report each run's tok/s (thermal throttling shows as a fall)
    wait: float = 300.0  # seconds to wait for a device: a browser to open the bench page, ssh or rpc to connect
    browsers: int = 1  # --device browser: how many browsers must post results before the table is written
    host: str = "127.0.0.1"  # --device browser: address the bench page listens on (0.0.0.0 for a phone on the LAN)
    serve_key_env: str = "EDGELM_SERVE_API_KEY"  # --device browser beyond loopback: variable with the page's key
    serve_key_file: str = ""  # or a file with it; a key is required when --host is not loopback
    insecure: bool = False  # --device browser: serve a non-loopback --host without a key
    isolation: bool = True  # --device browser: serve cross-origin isolated (threads); --no-isolation: as a plain web host
    remote_dir: str = ""  # --device ssh:// : the folder on the device for the runner and artifacts (~/.cache/edgelm-bench)
    qemu_root: str = "build/arm64-root"  # --device qemu-aarch64: an arm64 root with Python and apache-tvm (make tvm-aarch64), for TVM rows
    device_python: str = "python3"  # --device ssh:// : the device's Python for TVM rows (with apache-tvm and numpy)
    ssh_config: str = ""  # --device ssh:// : an ssh_config file (ssh -F) with the key, known hosts or jump host to use
    dry_run: bool = False  # list what would run, then stop
    progress: bool = True  # progress bar on stderr

    def validate(self) -> BenchConfig:
        if not self.models:
            raise EdgelmError("nothing to benchmark; pass one or more artifact folders, HF folders or .gguf files")
        for name in ("prompt_len", "gen_len", "repeat", "eval_seqs", "eval_seqlen"):
            if getattr(self, name) < 1:
                raise EdgelmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gen_len < 2:
            raise EdgelmError("--gen-len must be >= 2 (decode speed is measured after the first token)")
        for t in self.threads:
            if t < 1:
                raise EdgelmError(f"--threads must be whole numbers >= 1, got {t}")
        if self.sustained < 0 or self.browsers < 1 or self.wait <= 0:
            raise EdgelmError("--sustained must be >= 0, --browsers >= 1 and --wait > 0")
        if self.device != "local" and (self.quality or self.overhead):
            raise EdgelmError(f"--quality and --overhead run on this machine only; drop them for --device {self.device}")
        if self.split not in ("train", "val", "test"):
            raise EdgelmError(f"--split must be train, val or test, got {self.split!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
