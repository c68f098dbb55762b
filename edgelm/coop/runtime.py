"""CooperativeRuntime: the device answers, hard queries go to the cloud, and the device covers every cloud failure.

    coop = CooperativeRuntime(device=edgelm.load("runs/demo/export/gguf-gptq-int4-g32"),
                              cloud=CloudClient(CloudConfig(url="http://127.0.0.1:8001/v1")),
                              router="confidence", threshold=3.2)
    ans = coop.chat([{"role": "user", "content": "..."}], max_tokens=64)
    ans.text, ans.routed_to, ans.fallback_reason

Thread-safe: the device model runs one request at a time behind a bounded queue (``Busy`` when full); cloud calls
run concurrently.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from edgelm.cloud import CloudClient, CloudError
from edgelm.coop.privacy import PrivacyGuard
from edgelm.errors import EdgelmError
from edgelm.runtimes.base import Stream

if TYPE_CHECKING:
    from edgelm.coop.routers import Router
    from edgelm.runtimes.base import Runtime

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Busy(EdgelmError):
    """The device queue is full; the server answers 503."""

    exit_code = 75


@dataclass
class Answer:
    text: str  # the reply
    routed_to: str  # "device" or "cloud": who produced the text (the device after a cloud failure)
    router: str  # router name
    score: float | None  # router score (None when not scored: private, no cloud)
    threshold: float  # scores above it go to the cloud
    fallback_reason: str | None = None  # why the device answered a query meant for the cloud, or why it never asked
    private: list[str] = field(default_factory=list)  # "marked" and/or the detectors that fired
    device_latency_s: float = 0.0  # device time: routing + generation
    cloud_latency_s: float = 0.0  # time spent on the cloud, failed attempts included
    router_latency_s: float = 0.0  # the router's own time
    prompt_tokens: int = 0  # in the device's tokenizer
    cached_tokens: int = 0  # prompt tokens the device found in its KV cache (a conversation that continues)
    completion_tokens: int = 0  # device tokens generated (0 for cloud answers)
    cloud_chars: int = 0  # characters of the text that came from the cloud (all of it, or a cut stream's part)
    finish_reason: str = "stop"
    adapter: str | None = None  # the LoRA adapter the device ran with (None: the base)

    def metadata(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        for k in ("score", "threshold"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = str(d[k])  # JSON has no inf
        return d


class Metrics:
    """Counters and latency histograms in prometheus_client's own registry (one per runtime), exported in the
    Prometheus text format with HELP and TYPE for every metric and escaped label values."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()  # the cloud share is a ratio of two counts, updated together
        self._answered = 0
        self._intended_cloud = 0
        self.requests = Counter("edgelm_requests", "Answered requests by who produced the answer.", ["routed_to"],
                                registry=r)
        for who in ("device", "cloud"):
            self.requests.labels(who)  # both series exist from the start, at 0
        self.cloud_share = Gauge("edgelm_cloud_share", "Share of answered requests the router sent to the cloud.",
                                 registry=r)
        self.fallbacks = Counter("edgelm_fallbacks", "Cloud-bound requests the device answered, by reason.",
                                 ["reason"], registry=r)
        self.busy = Counter("edgelm_busy", "Requests refused (503) because the device queue was full.", registry=r)
        self.private = Counter("edgelm_private", "Requests kept on the device as private.", registry=r)
        self.latency = {k: Histogram(f"edgelm_{k}_seconds", doc, buckets=LATENCY_BUCKETS, registry=r) for k, doc in (
            ("request", "Whole request time."), ("device", "Device time per request: routing and generation."),
            ("cloud", "Time spent on the cloud per request, failed attempts included."))}

    def observe(self, ans: Answer, total_s: float) -> None:
        self.requests.labels(ans.routed_to).inc()
        if ans.fallback_reason and ans.routed_to == "device" and ans.score is not None:
            self.fallbacks.labels(ans.fallback_reason).inc()
        if ans.private:
            self.private.inc()
        with self._lock:
            self._answered += 1
            self._intended_cloud += ans.score is not None and ans.score > ans.threshold
            self.cloud_share.set(self._intended_cloud / self._answered)
        for key, v in (("request", total_s), ("device", ans.device_latency_s), ("cloud", ans.cloud_latency_s)):
            if key == "request" or v > 0:
                self.latency[key].observe(v)

    def prometheus(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")


class CoopStream(Stream):
    """Iterate for text deltas; ``answer`` holds the Answer once the iteration ends."""

    result_type = Answer

    @property
    def answer(self) -> Answer | None:
        return self.result


class CooperativeRuntime:
    def __init__(self, device: "Runtime", cloud: CloudClient | None, router: "Router | str", *,
                 threshold: float | None = None, privacy: PrivacyGuard | None = None, deadline: float = 10.0,
                 total_deadline: float | None = None, max_queue: int = 8) -> None:
        from edgelm.registry import ROUTERS

        self.device = device
        self.cloud = cloud
        self.router = ROUTERS.get(router).from_state({}) if isinstance(router, str) else router
        if self.router.needs_cloud and cloud is None:
            log.warning("router %s has no cloud: every query stays on the device", self.router.name)
        if threshold is None:
            if self.router.calibrated:
                raise EdgelmError(f"router {self.router.name!r} needs a threshold; calibrate it with a cloud budget")
            threshold = self.router.threshold_for_budget(0.0 if not self.router.needs_cloud else 1.0)
        self.threshold = threshold
        self.privacy = privacy or PrivacyGuard()
        if deadline <= 0:
            raise EdgelmError(f"deadline must be > 0 seconds, got {deadline}")
        total_deadline = max(deadline, 120.0) if total_deadline is None else total_deadline
        if total_deadline < deadline:
            raise EdgelmError(f"the cloud's total deadline ({total_deadline} s) must be at least its first-token "
                              f"deadline ({deadline} s)")
        self.deadline = deadline  # seconds from the request to the cloud's first token, else the device answers
        self.total_deadline = total_deadline  # seconds for the whole cloud answer; past it the device continues it
        self.max_queue = max_queue  # device requests waiting or running before Busy
        self._device_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued = 0
        self.metrics = Metrics()

    # --- public API ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the device runtime and the cloud client."""
        try:
            self.device.close()
        finally:
            if self.cloud is not None:
                self.cloud.close()

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 128, private: bool = False,
             stream: bool = False, adapter: str | None = None, **sampling: Any) -> Answer | CoopStream:
        """Answer a conversation; ``adapter``: the device's LoRA adapter to run with (None: the base)."""
        prompt = self.device.apply_chat_template(messages)
        text = "\n".join(str(m.get("content", "")) for m in messages)
        return self._serve("chat", messages, prompt, text, max_tokens, private, stream, sampling, adapter)

    def complete(self, prompt: str, *, max_tokens: int = 128, private: bool = False, stream: bool = False,
                 adapter: str | None = None, **sampling: Any) -> Answer | CoopStream:
        return self._serve("completion", prompt, prompt, prompt, max_tokens, private, stream, sampling, adapter)

    # --- internals -------------------------------------------------------------------------------------------------
    def _serve(self, kind, request, prompt, text, max_tokens, private, stream, sampling, adapter=None):
        from edgelm.runtimes.sampling import GenerationConfig

        GenerationConfig(max_new_tokens=max_tokens).with_options(**sampling)  # validate before queueing
        self.device.require_adapter(adapter)  # before queueing
        it = self._run(kind, request, prompt, text, max_tokens, private, sampling, adapter)
        if stream:
            return CoopStream(it)
        parts = []
        for item in it:
            if isinstance(item, Answer):
                item.text = "".join(parts)
                return item
            parts.append(item)
        raise AssertionError("no answer")

    def _enter_queue(self) -> None:
        with self._queue_lock:
            if self._queued >= self.max_queue:
                self.metrics.busy.inc()
                raise Busy(f"the device queue is full ({self._queued} requests); retry later")
            self._queued += 1

    def _leave_queue(self) -> None:
        with self._queue_lock:
            self._queued -= 1

    def _run(self, kind, request, prompt, text, max_tokens, private, sampling, adapter=None
             ) -> Iterator[str | Answer]:
        t0 = time.perf_counter()
        flags = (["marked"] if private else []) + self.privacy.flags(text)
        ans = Answer(text="", routed_to="device", router=self.router.name, score=None, threshold=self.threshold,
                     private=flags, adapter=adapter)
        ids = self.device.encode(prompt, special=kind != "chat")  # a rendered chat holds its BOS already
        ans.prompt_tokens = len(ids)
        too_long = len(ids) >= self.device.context
        decision = None
        if flags:
            ans.fallback_reason = "private"
        elif self.cloud is None or not self.router.needs_cloud:
            ans.fallback_reason = None if not self.router.needs_cloud else "no_cloud"
        elif too_long:
            ans.score = math.inf
            ans.fallback_reason = "prompt_exceeds_device_context"
        else:
            self._enter_queue()
            try:
                with self._device_lock:
                    self.device.set_adapter(adapter)  # a switch: the next prompt prefills afresh, the base stays
                    decision = self.router.score(self.device, ids)
                    if decision.draft:  # the router ran the prompt on the device: that is where the cache counted
                        ans.cached_tokens = self.device.last_cached
            finally:
                self._leave_queue()
            ans.score, ans.router_latency_s = decision.score, decision.seconds
            ans.device_latency_s += decision.seconds
        if too_long and (self.cloud is None or flags):
            raise EdgelmError(f"the prompt has {len(ids)} tokens but the device context holds {self.device.context}")
        if ans.score is not None and ans.score > self.threshold and self.cloud is not None:
            sent = []
            tc = time.perf_counter()
            try:
                for delta in self._cloud_stream(kind, request, max_tokens, sampling, t0):
                    sent.append(delta)
                    yield delta
                ans.routed_to, ans.cloud_latency_s = "cloud", time.perf_counter() - tc
                ans.cloud_chars = sum(map(len, sent))
                self.metrics.observe(ans, time.perf_counter() - t0)
                yield ans
                return
            except CloudError as e:
                ans.cloud_latency_s = time.perf_counter() - tc
                ans.fallback_reason = e.reason
                log.info("cloud failed (%s) after %.2f s: the device answers", e.reason, ans.cloud_latency_s)
                ans.cloud_chars = sum(map(len, sent))
                if sent:  # a cut stream: the device continues the text the client already has
                    ids = self.device.encode(prompt + "".join(sent), special=kind != "chat")
                    max_tokens = max(1, max_tokens - len(self.device.encode("".join(sent), special=False)))
                    decision = None
        yield from self._device_answer(ids, max_tokens, sampling, decision, ans, adapter)
        self.metrics.observe(ans, time.perf_counter() - t0)
        yield ans

    def _cloud_stream(self, kind, request, max_tokens, sampling, t0) -> Iterator[str]:
        params = {k: v for k, v in sampling.items() if k in ("temperature", "top_p", "seed", "stop")}
        if not sampling.get("do_sample", False):
            params.setdefault("temperature", 0.0)
        spent = time.perf_counter() - t0  # routing, on the device
        first = time.monotonic() + max(0.0, self.deadline - spent)
        total = time.monotonic() + max(0.0, self.total_deadline - spent)
        if kind == "chat":
            payload = {"messages": request, "max_tokens": max_tokens, **params}
            yield from self.cloud.stream("chat/completions", payload, total, first)
        else:
            payload = {"prompt": request, "max_tokens": max_tokens, **params}
            yield from self.cloud.stream("completions", payload, total, first)

    def _device_answer(self, ids, max_tokens, sampling, decision, ans: Answer, adapter: str | None = None
                       ) -> Iterator[str]:
        from edgelm.runtimes.sampling import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=max_tokens).with_options(**sampling)
        draft = decision.draft[:max_tokens] if decision is not None else []
        stop = set(self.device.tokenizer.eos_ids) if self.device.tokenizer else set()
        if draft and (cfg.do_sample or "\ufffd" in self.device.decode(draft[-1:]) or cfg.stop):
            draft = []  # a sampled answer, a split character or stop strings: start over
        self._enter_queue()
        try:
            with self._device_lock:
                td = time.perf_counter()
                self.device.set_adapter(adapter)
                if draft:
                    head = [t for t in draft if t not in stop]
                    yield self.device.decode(head)
                    rest_n = max_tokens - len(draft)
                    if len(head) < len(draft) or rest_n <= 0:
                        ans.completion_tokens = len(head)
                        ans.finish_reason = "stop" if len(head) < len(draft) else "length"
                    else:
                        s = self.device.generate(ids + draft, cfg.with_options(max_new_tokens=rest_n), stream=True)
                        yield from s
                        ans.completion_tokens = len(draft) + len(s.result.ids)
                        ans.finish_reason = s.result.finish_reason
                else:
                    s = self.device.generate(ids, cfg, stream=True)
                    yield from s
                    ans.completion_tokens, ans.finish_reason = len(s.result.ids), s.result.finish_reason
                    if decision is None or not decision.draft:
                        ans.cached_tokens = s.result.cached_tokens
                ans.device_latency_s += time.perf_counter() - td
        finally:
            self._leave_queue()
