"""Build a CooperativeRuntime from a ServeConfig (used by `edgelm serve` and the Python API)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.coop.config import RouteConfig, ServeConfig
from edgelm.coop.routers import RouterState, router_from_state
from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.coop.evaluate import Gap, RouterSummary

log = logging.getLogger(__name__)


def build_runtime(config: ServeConfig | None = None, **kwargs: Any):
    from edgelm.cloud import CloudClient, CloudConfig
    from edgelm.coop.data import function_queries
    from edgelm.coop.routers import calibrate, check_budget
    from edgelm.coop.runtime import CooperativeRuntime
    from edgelm.registry import ROUTERS
    from edgelm.runtimes.api import load

    c = replace(config or ServeConfig(), **kwargs)
    if not c.device:
        raise EdgelmError("pass --device: the on-device model (artifact folder, HF folder or .gguf)")
    check_budget(c.cloud_budget)
    state = RouterState.load(c.router_file) if c.router_file and Path(c.router_file).is_file() else None
    router = router_from_state(state) if state else ROUTERS.get(c.router).from_state({})
    if router.needs_cloud and not c.cloud_url:
        raise EdgelmError(f"router {router.name!r} needs a cloud: pass --cloud-url (or --router always-device)")
    if c.max_queue < 1:
        raise EdgelmError(f"--max-queue must be >= 1, got {c.max_queue}")
    with contextlib.ExitStack() as stack:  # closes what was opened if anything below fails
        # keep_cache: a conversation's next request prefills only its new turn
        device = load(c.device, runtime=c.runtime or None, threads=c.threads, keep_cache=True,
                      adapters=parse_adapters(c.adapter))
        stack.callback(device.close)
        cloud = None
        if c.cloud_url and router.needs_cloud:
            cloud = CloudClient(CloudConfig(url=c.cloud_url, model=c.cloud_model, api_key_env=c.api_key_env,
                                            api_key_file=c.api_key_file))
            stack.callback(cloud.close)
            if not cloud.reachable():
                log.warning("the cloud at %s does not answer: serving device-only for now (requests will retry it)",
                            c.cloud_url)
        if state is None:
            if c.threshold is not None:
                state = RouterState(router.name, c.threshold, None, {"fixed": True})
            else:
                queries = function_queries(c.data, "val", c.calib_queries) if router.calibrated else []
                log.info("calibrating %s on %d val-split queries for a cloud budget of %.0f%%", router.name,
                         len(queries), 100 * c.cloud_budget)
                state = calibrate(router, device, [device.encode(q.prompt) for q in queries], c.cloud_budget)
                state.calibration["data"] = list(c.data) or "stdlib"
            if c.router_file:
                state.save(c.router_file)
        log.info("router %s, threshold %s (calibration: %s)", state.router, f"{state.threshold:.4g}",
                 state.calibration)
        coop = CooperativeRuntime(device, cloud, router, threshold=state.threshold, deadline=c.deadline,
                                  total_deadline=c.total_deadline, max_queue=c.max_queue)
        stack.pop_all()  # the cooperative runtime owns them now: coop.close()
    return coop, state


def parse_adapters(specs: tuple[str, ...]) -> dict[str, str]:
    """--adapter NAME=PATH ... as {NAME: PATH}; a spec without a name, or a name twice, is refused in one line."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise EdgelmError(f"--adapter {spec!r}: write NAME=PATH (the name a request's model field picks)")
        if name in out:
            raise EdgelmError(f"--adapter: the name {name!r} is given twice; give each adapter its own name")
        out[name.strip()] = path
    return out


def serve(config: ServeConfig | None = None, **kwargs: Any) -> None:
    """Build the runtime and serve it with uvicorn until interrupted."""
    c = replace(config or ServeConfig(), **kwargs)
    try:
        import uvicorn

        from edgelm.coop.server import create_app
    except ImportError:
        raise EdgelmError("serving needs fastapi and uvicorn; pip install 'edgelm[serve]'") from None
    from edgelm.coop.httpsafe import check_limits, tls_options

    check_limits(c.max_body_bytes, c.max_tokens_limit)
    key = inbound_key(c)
    tls = tls_options(c.host, c.tls_cert, c.tls_key)
    coop, _ = build_runtime(c)
    try:
        log.info("serving on %s://%s:%d/v1 (OpenAI-compatible; /health, /info, /metrics)%s",
                 "https" if tls else "http", c.host, c.port, "; clients must send the API key" if key else "")
        uvicorn.run(create_app(coop, api_key=key, max_body_bytes=c.max_body_bytes,
                               max_tokens_limit=c.max_tokens_limit),
                    host=c.host, port=c.port, log_level="warning", **tls)
    finally:
        coop.close()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def inbound_key(c: ServeConfig) -> str | None:
    """The key clients must send, if any; refuses a server reachable beyond this machine without one, since it holds
    the cloud key and anyone who reaches it spends the user's cloud budget (as llama.cpp's server asks --api-key)."""
    from edgelm.cloud import read_key

    key = read_key(c.serve_key_env, c.serve_key_file)
    if key is None and not is_loopback(c.host):
        if not c.insecure:
            raise EdgelmError(f"--host {c.host} lets other machines reach this server and spend its cloud budget; set "
                              f"{c.serve_key_env} (or --serve-key-file) to a key clients must send, or pass --insecure")
        log.warning("serving %s without an API key (--insecure): anyone who reaches it can use the cloud", c.host)
    return key


def has_key(headers: Any, key: str) -> bool:
    """Whether request ``headers`` carry ``key`` as ``Authorization: Bearer <key>`` or ``x-api-key`` (constant-time)."""
    import hmac

    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def _open_device_and_cloud(c, stack: contextlib.ExitStack):
    """The device runtime and cloud client of a RouteConfig, each closed by ``stack`` on every path."""
    from edgelm.cloud import CloudClient, CloudConfig
    from edgelm.runtimes.api import load

    if not c.device:
        raise EdgelmError("pass --device: the on-device model (artifact folder, HF folder or .gguf)")
    if not c.cloud_url:
        raise EdgelmError("pass --cloud-url: routers are trained and judged against a cloud model")
    cloud = CloudClient(CloudConfig(url=c.cloud_url, model=c.cloud_model, api_key_env=c.api_key_env,
                                    api_key_file=c.api_key_file, read_timeout=120, retries=3))
    stack.callback(cloud.close)
    if not cloud.reachable():
        raise EdgelmError(f"the cloud at {c.cloud_url} does not answer; start it or fix --cloud-url")
    device = load(c.device, runtime=c.runtime or None, threads=c.threads)
    stack.callback(device.close)
    return device, cloud


def _with_task_tokens(c: RouteConfig) -> RouteConfig:
    """The config with its task checked and ``max_tokens`` 0 resolved to the task's own."""
    from edgelm.coop.data import TASKS

    if c.task not in TASKS:
        raise EdgelmError(f"unknown routing task {c.task!r}; pick one of {', '.join(TASKS)}")
    return replace(c, max_tokens=c.max_tokens or TASKS[c.task][1])


def _journal(c: RouteConfig, path: Path, **more: Any):
    """The run's journal of judged queries (see evaluate.Journal); its settings are what the answers depend on."""
    from edgelm.coop.evaluate import Journal

    keep = ("device", "runtime", "cloud_url", "cloud_model", "task", "data", "queries", "max_tokens")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in c.as_dict().items() if k in keep}
    return Journal(path, {**settings, **more}, resume=c.resume, force=c.force)


def route_train(config: RouteConfig | None = None, **kwargs: Any) -> RouterState:
    """Fit the learned router on train-split queries; write it, with the threshold for --cloud-budget, to --out."""
    import numpy as np

    from edgelm.coop.data import task_queries
    from edgelm.coop.evaluate import judge, prompt_ids, save_judged
    from edgelm.coop.learn import LearnedRouter, features, select_and_fit
    from edgelm.coop.routers import check_budget

    c = _with_task_tokens(replace(config or RouteConfig(), **kwargs))
    check_budget(c.cloud_budget)
    if not c.out:
        raise EdgelmError("pass --out: the router file to write (e.g. runs/router.json)")
    out = Path(c.out)
    if out.exists() and not c.force:
        raise EdgelmError(f"{out} exists; pass --force to replace it")
    with contextlib.ExitStack() as stack:
        device, cloud = _open_device_and_cloud(c, stack)
        queries = task_queries(c.task, c.data, "train", c.queries)
        log.info("route train: %d train-split %s queries, device and cloud answer each (%d tokens)", len(queries),
                 c.task, c.max_tokens)
        journal = _journal(c, out.with_name(out.stem + ".train-answers.jsonl"))
        judged = judge(device, cloud, queries, max_tokens=c.max_tokens, progress=c.progress, journal=journal)
        X = np.stack([features(device, prompt_ids(device, q))[0] for q in queries])
    y = np.array([j.cloud - j.device for j in judged])
    model, cv = select_and_fit(X, y)
    log.info("route train: cross-validation chose %s", cv["chosen"])
    router = LearnedRouter(model)
    pred = np.array([router.model.predict(x) for x in X])
    t = float(np.quantile(pred, 1 - c.cloud_budget, method="lower")) if 0 < c.cloud_budget < 1 else (
        float("inf") if c.cloud_budget <= 0 else float("-inf"))
    fit_corr = float(np.corrcoef(pred, y)[0, 1]) if y.std() > 0 else float("nan")
    state = RouterState(router.name, t, c.cloud_budget,
                        {"queries": len(queries), "task": c.task, "split": "train",
                         "achieved_share": float((pred > t).mean()),
                         "train_corr": fit_corr, "device_quality": float(np.mean([j.device for j in judged])),
                         "cloud_quality": float(np.mean([j.cloud for j in judged])), **cv}, router.state())
    state.save(out)
    save_judged(judged, out.with_name(out.stem + ".train-answers.json"))
    journal.finish()
    return state


@dataclass
class RouteEvalResult:
    queries: int  # test-split queries judged
    device_quality: float  # mean answer quality of the device alone
    cloud_quality: float  # ... of the cloud alone
    routers: list["RouterSummary"]  # random, each scored router, then the oracle
    table: str  # the markdown table written to routing.md (or the sentence saying why there is none)
    config: dict[str, Any] = field(default_factory=dict)  # the RouteConfig it ran with
    gap: dict[str, Any] = field(default_factory=dict)  # evaluate.Gap: the gap, its interval, whether it is judgeable
    verdict: str = ""  # one sentence on the gap (Gap.verdict)

    def by_router(self) -> dict[str, "RouterSummary"]:
        return {s.router: s for s in self.routers}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def routing_table(sums: list["RouterSummary"], judged: list, gap: "Gap") -> str:
    """The routers' markdown table: APGR only where the gap is judgeable ("-" otherwise), CPT with its interval
    always, and each scored router's cost per query."""
    import numpy as np

    from edgelm.report import md_table

    rows = []
    for s in sums:
        scored = s.router in judged[0].scores
        ci = f"{100 * s.cpt80_ci95[0]:.0f}-{100 * s.cpt80_ci95[1]:.0f}%" if s.cpt80_ci95 else "-"
        rows.append([s.router, f"{s.apgr:.3f}" if gap.judgeable else "-", f"{100 * s.cpt50:.0f}%",
                     f"{100 * s.cpt80:.0f}%", ci,
                     f"{1e3 * float(np.mean([j.seconds.get(s.router, 0.0) for j in judged])):.1f}" if scored else "-"])
    return md_table(["router", "APGR", "CPT(50%)", "CPT(80%)", "CPT(80%) 95% interval", "router ms/query"], rows)


def route_eval(config: RouteConfig | None = None, **kwargs: Any) -> RouteEvalResult:
    """Judge every router on test-split queries; write table, plot and JSON into --out."""
    from edgelm.coop.data import task_queries
    from edgelm.coop.evaluate import (RouterSummary, bootstrap_cpt80, judge, plot_curves, quality_gap,
                                      random_summary, save_judged, summarize)
    from edgelm.fsutil import atomic_write_json, atomic_write_text
    from edgelm.registry import ROUTERS

    c = _with_task_tokens(replace(config or RouteConfig(), **kwargs))
    if not c.out:
        raise EdgelmError("pass --out: a folder for the table, plot and JSON")
    routers = [ROUTERS.get("confidence")(), ROUTERS.get("confidence-draft")()]
    if c.router_file:
        state = RouterState.load(c.router_file)
        trained_on = state.calibration.get("task", "complete")
        if trained_on != c.task:
            log.warning("the learned router in %s was trained on %s queries, judged here on %s ones", c.router_file,
                        trained_on, c.task)
        routers.append(router_from_state(state))
    out = Path(c.out)
    with contextlib.ExitStack() as stack:
        device, cloud = _open_device_and_cloud(c, stack)
        queries = task_queries(c.task, c.data, "test", c.queries)
        log.info("route eval: %d test-split %s queries, routers %s", len(queries), c.task,
                 ", ".join(r.name for r in routers))
        journal = _journal(c, out / "answers.jsonl", routers=[r.name for r in routers])
        judged = judge(device, cloud, queries, max_tokens=c.max_tokens, routers=routers, progress=c.progress,
                       journal=journal)
    out.mkdir(parents=True, exist_ok=True)
    save_judged(judged, out / "answers.json")
    journal.finish()
    gap = quality_gap(judged)
    sums: list[RouterSummary] = []
    if gap.gap > 0:  # every figure below divides by it
        sums = [random_summary(judged)] + [summarize(judged, r.name, [j.scores[r.name] for j in judged])
                                           for r in routers]
        sums.append(summarize(judged, "oracle", [j.cloud - j.device for j in judged]))
    for s in sums:
        if s.router in judged[0].scores:  # how much CPT(80%) owes to the draw of test queries
            s.cpt80_ci95 = bootstrap_cpt80(judged, [j.scores[s.router] for j in judged])
    table = routing_table(sums, judged, gap) if sums else gap.verdict + "\n"
    if sums:
        plot_curves(sums, judged, out / "routing.png")
    result = RouteEvalResult(len(judged), gap.device, gap.cloud, sums, table, c.as_dict(), asdict(gap), gap.verdict)
    atomic_write_json(out / "routing.json", result.as_dict())
    measure = "edit similarity of the first lines" if c.task == "complete" else "verified score"
    atomic_write_text(out / "routing.md", f"Task {c.task}: device quality {gap.device:.3f}, cloud quality "
                      f"{gap.cloud:.3f} ({measure}), {len(judged)} queries. {gap.verdict}\n\n" + table
                      + ("\n![quality vs cloud share](routing.png)\n" if sums else ""))
    if not gap.judgeable:
        log.warning("%s", gap.verdict)
    return result
