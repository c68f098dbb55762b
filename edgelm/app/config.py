"""Options of `edgelm app build` and `edgelm app serve`; each field becomes a CLI flag, its comment the help text."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AppBuildConfig:
    artifacts: tuple[str, ...] = ()  # GGUF and ONNX artifact folders (edgelm export); the first is the default
    out: str = ""  # the app folder to write
    router: str = ""  # a router file (edgelm serve --router-file) the page can compute; default: calibrate one
    cloud_budget: float = 0.3  # share of calibration queries the page's auto mode sends to the cloud
    calib_queries: int = 32  # val-split functions the router's threshold is calibrated on
    data: tuple[str, ...] = ()  # calibration corpus (default: the stdlib source)
    web: str = ""  # the web app's folder (default: the one installed with edgelm; android_demo/www of a checkout)
    force: bool = False  # replace --out if it exists


@dataclass(frozen=True)
class AppServeConfig:
    folder: str = ""  # the folder `edgelm app build` wrote
    cloud: str = ""  # OpenAI-compatible cloud the page's /v1 requests are proxied to, e.g. http://127.0.0.1:8080/v1
    api_key_env: str = "EDGELM_CLOUD_API_KEY"  # environment variable with the cloud's API key (never sent to the page)
    api_key_file: str = ""  # or a file with it
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8090  # port to listen on
    serve_key_env: str = "EDGELM_SERVE_API_KEY"  # environment variable with the key the page must send for /v1
    serve_key_file: str = ""  # or a file with it; a key is required when --host is not loopback
    insecure: bool = False  # proxy /v1 for a non-loopback --host without a key (anyone who reaches it spends the cloud)
    cors_origin: tuple[str, ...] = ()  # other origins whose pages may call /v1 (the Android app: http://localhost)
    tls_cert: str = ""  # PEM certificate: serve HTTPS (with --tls-key); without it, a non-loopback --host warns
    tls_key: str = ""  # the certificate's PEM private key
    max_body_bytes: int = 1048576  # largest request body proxied (413 above it)
    max_tokens_limit: int = 2048  # largest max_tokens the page may ask of the cloud (400 above; sent when absent)
