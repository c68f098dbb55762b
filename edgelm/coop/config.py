"""Options of `edgelm serve`; each field becomes a CLI flag, its comment the help text."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ServeConfig:
    device: str = ""  # the on-device model: an artifact folder, HF folder or .gguf
    runtime: str = ""  # force the device runtime (edgelm list runtimes)
    threads: int | None = None  # device runtime threads (default: its own pick)
    # (adapter artifacts of edgelm export ADAPTER --base DEVICE; the base is the server's own name, or none)
    adapter: tuple[str, ...] = ()  # LoRA adapters over the device model, NAME=PATH; a request's "model" picks one
    cloud_url: str = ""  # OpenAI-compatible cloud, e.g. http://127.0.0.1:8001/v1 (none: device only)
    cloud_model: str = ""  # model name sent to the cloud
    api_key_env: str = "EDGELM_CLOUD_API_KEY"  # environment variable with the cloud API key
    api_key_file: str = ""  # or a file with it (never logged)
    router: str = "confidence"  # router (edgelm list routers)
    cloud_budget: float = 0.3  # share of calibration queries the threshold sends to the cloud
    threshold: float | None = None  # a fixed threshold instead of calibrating for --cloud-budget
    router_file: str = ""  # load the router and threshold saved by an earlier calibration (and save new ones here)
    data: tuple[str, ...] = ()  # calibration corpus: functions of its val split are the queries (default: stdlib)
    calib_queries: int = 32  # calibration queries
    deadline: float = 10.0  # seconds from a request to the cloud's first token; past it the device answers
    total_deadline: float = 120.0  # seconds for a whole cloud answer; past it the device continues the cut text
    max_queue: int = 8  # device requests waiting or running before 503
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # port to listen on
    serve_key_env: str = "EDGELM_SERVE_API_KEY"  # environment variable with the key clients must send (Bearer)
    serve_key_file: str = ""  # or a file with it; a key is required when --host is not loopback
    insecure: bool = False  # serve a non-loopback --host without a key (anyone who reaches it spends the cloud budget)
    tls_cert: str = ""  # PEM certificate: serve HTTPS (with --tls-key); without it, a non-loopback --host warns
    tls_key: str = ""  # the certificate's PEM private key
    max_body_bytes: int = 1048576  # largest request body accepted (413 above it)
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask for (400 above it; the cloud never gets more)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RouteConfig:
    device: str = ""  # the on-device model: an artifact folder, HF folder or .gguf
    runtime: str = ""  # force the device runtime (edgelm list runtimes)
    threads: int | None = None  # device runtime threads (default: its own pick)
    cloud_url: str = ""  # OpenAI-compatible cloud, e.g. http://127.0.0.1:8001/v1
    cloud_model: str = ""  # model name sent to the cloud
    api_key_env: str = "EDGELM_CLOUD_API_KEY"  # environment variable with the cloud API key
    api_key_file: str = ""  # or a file with it (never logged)
    task: str = "complete"  # queries: complete (code continuation), chat (verified checks) or humaneval (eval only)
    data: tuple[str, ...] = ()  # corpus whose functions are the queries (default: stdlib source)
    queries: int = 200  # queries (train split for `route train`, test split for `route eval`)
    max_tokens: int = 0  # tokens each side answers with (0: the task's: complete 48, chat 256, humaneval 384)
    cloud_budget: float = 0.3  # `route train`: the share of training queries its threshold sends to the cloud
    router_file: str = ""  # `route eval`: a trained learned router to compare (from `route train`)
    out: str = ""  # `route train`: the router file to write; `route eval`: a folder for table, plot and JSON
    force: bool = False  # replace --out (and a partial run's journal) if it exists
    resume: bool = False  # continue a run a cloud failure cut: judged queries are read back, failed ones retried
    progress: bool = True  # progress bar

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
