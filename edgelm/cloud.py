"""OpenAI-compatible client, for the cooperative runtime's cloud and a served chat teacher: timeouts, bounded retries
with backoff (timeouts, refused connections, 429, 5xx; one policy for plain and streamed requests), a circuit breaker
and a per-request deadline. Every failure is a CloudError with a short reason the caller reports.

The retry loop is our own, not tenacity's or httpx's: httpx's transport retries cover refused connections only, and
what the loop must also do (stop when the deadline leaves less than the next backoff, never replay a stream that
already delivered text, count a request once in the breaker) would be custom callbacks around tenacity anyway.

The API key comes only from an environment variable or a file; it is sent in the Authorization header and never
appears in logs, errors, metrics or artifacts.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)
T = TypeVar("T")
# Failures worth another attempt (with http_5xx): the next one may well succeed. http_4xx, malformed JSON, a cut
# stream and a spent deadline are final.
RETRIABLE = ("timeout", "unreachable", "http_429")


@dataclass(frozen=True)
class CloudConfig:
    url: str = ""  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8001/v1
    model: str = ""  # model name sent to the cloud (empty: the server's default)
    api_key_env: str = "EDGELM_CLOUD_API_KEY"  # environment variable holding the API key
    api_key_file: str = ""  # or a file holding it (first line)
    connect_timeout: float = 2.0  # seconds to connect
    read_timeout: float = 30.0  # seconds between bytes of a response
    retries: int = 2  # extra attempts on 429/5xx and connection errors, within the deadline
    backoff: float = 0.2  # seconds before the first retry; doubles each time
    breaker_failures: int = 3  # consecutive failures that open the circuit breaker
    breaker_reset: float = 10.0  # seconds the breaker stays open before one trial request

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CloudError(EdgelmError):
    """The cloud gave no usable answer. ``reason`` is short and safe to show (no key, no body). An EdgelmError, so
    one that escapes to the CLI is one line, not a traceback."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the cloud gave no usable answer ({reason}); check that it is up and what --cloud-url "
                         "points to")
        self.reason = reason


def read_key(env: str, file: str = "") -> str | None:
    """An API key from the first line of ``file`` when given, else from the environment variable ``env``."""
    if file:
        p = Path(file).expanduser()
        try:
            return p.read_text(encoding="utf-8").splitlines()[0].strip() or None
        except (OSError, IndexError):
            raise EdgelmError(f"cannot read the API key file {p}; pass an existing file with the key on its first line") from None
    return os.environ.get(env) or None


class CloudClient:
    """Thread-safe; one connection pool. ``chat``/``complete`` return text; ``stream_*`` yield text deltas."""

    def __init__(self, cfg: CloudConfig) -> None:
        from edgelm.errors import require

        httpx = require("httpx", "serve")

        if not cfg.url.startswith(("http://", "https://")):
            raise EdgelmError(f"cloud URL {cfg.url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8001/v1)")
        self.cfg = cfg
        key = read_key(cfg.api_key_env, cfg.api_key_file)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=cfg.url.rstrip("/") + "/", headers=headers,
                                  timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
                                  limits=httpx.Limits(max_connections=32))
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self.calls = 0  # requests sent (attempts included), counted under the lock

    # --- circuit breaker ----------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._lock:
            if self._failures >= self.cfg.breaker_failures and time.monotonic() < self._open_until:
                raise CloudError("circuit_open")
            if self._failures >= self.cfg.breaker_failures:  # half-open: let this one try
                self._open_until = time.monotonic() + self.cfg.breaker_reset

    def _result(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures = 0
            else:
                self._failures += 1
                if self._failures >= self.cfg.breaker_failures:
                    self._open_until = time.monotonic() + self.cfg.breaker_reset

    @property
    def breaker_open(self) -> bool:
        with self._lock:
            return self._failures >= self.cfg.breaker_failures and time.monotonic() < self._open_until

    # --- requests --------------------------------------------------------------------------------------------------
    def _body(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {**({"model": self.cfg.model} if self.cfg.model else {}), **payload}

    def _retrying(self, once: Callable[[], Iterator[T]], deadline: float) -> Iterator[T]:
        """One retry policy for every request: run ``once`` (one attempt, yielding what it reads) until it succeeds,
        retrying timeouts, refused connections, 429 and 5xx with doubling backoff while the deadline leaves room
        and nothing has been yielded yet (a stream that already delivered text is not replayed). Every failure ends
        in a CloudError; the breaker counts the request, not its attempts."""
        self._admit()
        delay, attempt = self.cfg.backoff, 0
        while True:
            started = False
            try:
                if deadline - time.monotonic() <= 0:
                    raise CloudError("deadline")
                with self._lock:
                    self.calls += 1
                for item in once():
                    started = True
                    yield item
                self._result(True)
                return
            except CloudError as e:
                attempt += 1
                if (started or e.reason not in RETRIABLE and not e.reason.startswith("http_5")
                        or attempt > self.cfg.retries or deadline - time.monotonic() <= delay):
                    self._result(False)
                    raise
                log.debug("cloud: %s, retry %d in %.2f s", e.reason, attempt, delay)
                time.sleep(delay)
                delay *= 2

    def _timeout(self, deadline: float):
        import httpx

        left = max(deadline - time.monotonic(), 0.001)
        return httpx.Timeout(min(left, self.cfg.read_timeout), connect=min(left, self.cfg.connect_timeout))

    @staticmethod
    def _transport_error(e: Exception, deadline: float) -> CloudError:
        import httpx

        if isinstance(e, httpx.TimeoutException):
            return CloudError("deadline" if deadline - time.monotonic() <= 0.05 else "timeout")
        if isinstance(e, httpx.ConnectError):
            return CloudError("unreachable")
        return CloudError("stream_cut")

    def _post(self, path: str, payload: dict[str, Any], deadline: float) -> dict[str, Any]:
        """POST with the retry policy until ``deadline`` (time.monotonic()); the parsed JSON body."""
        import httpx

        def once() -> Iterator[dict[str, Any]]:
            try:
                r = self._http.post(path, json=self._body(payload), timeout=self._timeout(deadline))
            except httpx.TransportError as e:
                err = self._transport_error(e, deadline)
                raise (CloudError("unreachable") if err.reason == "stream_cut" else err) from None
            if r.status_code >= 400:
                raise CloudError(f"http_{r.status_code}")
            try:
                yield r.json()
            except ValueError:
                raise CloudError("malformed_json") from None

        return list(self._retrying(once, deadline))[0]

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int, deadline: float, **params: Any) -> str:
        return self.chat_answer(messages, max_tokens=max_tokens, deadline=deadline, **params)[0]

    def chat_answer(self, messages: list[dict[str, str]], *, max_tokens: int, deadline: float, **params: Any
                    ) -> tuple[str, bool]:
        """(text, finished): ``finished`` is False when the answer was cut at ``max_tokens`` (finish_reason
        "length")."""
        body = self._post("chat/completions", {"messages": messages, "max_tokens": max_tokens, **params}, deadline)
        try:
            choice = body["choices"][0]
            return str(choice["message"]["content"] or ""), choice.get("finish_reason") != "length"
        except (KeyError, IndexError, TypeError, AttributeError):
            raise CloudError("malformed_json") from None

    def complete(self, prompt: str, *, max_tokens: int, deadline: float, **params: Any) -> str:
        body = self._post("completions", {"prompt": prompt, "max_tokens": max_tokens, **params}, deadline)
        try:
            return str(body["choices"][0]["text"] or "")
        except (KeyError, IndexError, TypeError):
            raise CloudError("malformed_json") from None

    def stream(self, path: str, payload: dict[str, Any], deadline: float, first_token: float | None = None
               ) -> Iterator[str]:
        """Text deltas of a streamed completion ("chat/completions" or "completions"). Two deadlines
        (time.monotonic()): ``first_token`` for the first delta (connects and retries included; default
        ``deadline``), and ``deadline`` for the whole answer, so a long answer that started in time is not cut at
        the first one. Raises CloudError when the stream fails ("deadline" before the first delta,
        "total_deadline" after it); deltas already yielded stay valid (the caller continues from them). A failure
        before the first delta is retried like any request (see ``_retrying``)."""
        first = min(deadline, first_token if first_token is not None else deadline)
        return self._retrying(lambda: self._stream_once(path, payload, deadline, first), first)

    def _stream_once(self, path: str, payload: dict[str, Any], deadline: float, first: float) -> Iterator[str]:
        """One attempt. The network timeouts are bounded by the first-token budget left at the start (so the
        headers and first bytes come in time) and by ``read_timeout`` between bytes."""
        import httpx

        chat = path.startswith("chat")
        done = started = False
        try:
            with self._http.stream("POST", path, json=self._body({**payload, "stream": True}),
                                   timeout=self._timeout(first)) as r:
                if r.status_code >= 400:
                    raise CloudError(f"http_{r.status_code}")
                if "text/event-stream" not in r.headers.get("content-type", ""):
                    # a server that ignored "stream": one JSON answer, or garbage
                    try:
                        choice = json.loads(r.read())["choices"][0]
                        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        raise CloudError("malformed_json") from None
                    if not isinstance(text, str):
                        raise CloudError("malformed_json")
                    done = True
                    if text:
                        yield text
                    r.close()
                for line in ([] if done else r.iter_lines()):
                    now = time.monotonic()
                    if now > (deadline if started else first):
                        raise CloudError("total_deadline" if started else "deadline")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        choice = json.loads(data)["choices"][0]
                        delta = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        raise CloudError("malformed_json") from None
                    if delta:
                        started = True
                        yield delta
        except httpx.TransportError as e:
            raise self._transport_error(e, deadline if started else first) from None
        if not done:
            raise CloudError("stream_cut")

    def reachable(self, timeout: float = 2.0) -> bool:
        """GET models: is anything answering at the URL?"""
        import httpx

        try:
            return self._http.get("models", timeout=timeout).status_code < 500
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()
