"""Build a CooperativeRuntime from a ServeConfig (used by `edgelm serve` and the Python API)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgelm.coop.config import ServeConfig
from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)


def build_runtime(config: ServeConfig | None = None, **kwargs: Any):
    from dataclasses import replace

    from edgelm.coop.cloud import CloudClient, CloudConfig
    from edgelm.coop.data import function_queries
    from edgelm.coop.routers import RouterState, calibrate, check_budget
    from edgelm.coop.runtime import CooperativeRuntime
    from edgelm.registry import ROUTERS
    from edgelm.runtimes.loader import load

    c = replace(config or ServeConfig(), **kwargs)
    if not c.device:
        raise EdgelmError("pass --device: the on-device model (artifact folder, HF folder or .gguf)")
    check_budget(c.cloud_budget)
    state = RouterState.load(c.router_file) if c.router_file and Path(c.router_file).is_file() else None
    router = ROUTERS.get(state.router if state else c.router)()
    if router.needs_cloud and not c.cloud_url:
        raise EdgelmError(f"router {router.name!r} needs a cloud: pass --cloud-url (or --router always-device)")
    if c.max_queue < 1:
        raise EdgelmError(f"--max-queue must be >= 1, got {c.max_queue}")
    device = load(c.device, runtime=c.runtime or None, threads=c.threads)
    cloud = None
    if c.cloud_url and router.needs_cloud:
        cloud = CloudClient(CloudConfig(url=c.cloud_url, model=c.cloud_model, api_key_env=c.api_key_env,
                                        api_key_file=c.api_key_file))
        if not cloud.reachable():
            log.warning("the cloud at %s does not answer: serving device-only for now (requests will retry it)",
                        c.cloud_url)
    if state is None:
        if c.threshold is not None:
            state = RouterState(router.name, c.threshold, None, {"fixed": True})
        else:
            queries = function_queries(c.data, "val", c.calib_queries) if router.calibrated else []
            log.info("calibrating %s on %d val-split queries for a cloud budget of %.0f%%", router.name, len(queries),
                     100 * c.cloud_budget)
            state = calibrate(router, device, [device.encode(q.prompt) for q in queries], c.cloud_budget)
            state.calibration["data"] = list(c.data) or "stdlib"
        if c.router_file:
            state.save(c.router_file)
    log.info("router %s, threshold %s (calibration: %s)", state.router, f"{state.threshold:.4g}", state.calibration)
    return CooperativeRuntime(device, cloud, router, threshold=state.threshold, deadline=c.deadline,
                              max_queue=c.max_queue), state


def serve(config: ServeConfig | None = None, **kwargs: Any) -> None:
    """Build the runtime and serve it with uvicorn until interrupted."""
    from dataclasses import replace

    c = replace(config or ServeConfig(), **kwargs)
    try:
        import uvicorn

        from edgelm.coop.server import create_app
    except ImportError:
        raise EdgelmError("serving needs fastapi and uvicorn; pip install 'edgelm[serve]'") from None
    coop, _ = build_runtime(c)
    log.info("serving on http://%s:%d/v1 (OpenAI-compatible; /health, /metrics)", c.host, c.port)
    uvicorn.run(create_app(coop), host=c.host, port=c.port, log_level="warning")
