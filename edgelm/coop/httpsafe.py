"""What both servers (`edgelm serve` and `edgelm app serve`) do at their network edge: bounded bodies, bounded
``max_tokens``, OpenAI-shaped errors, TLS options, and a stream whose producer never waits on its client.

Imported only to serve (starlette is in edgelm[serve]).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


class Refusal(Exception):
    """A request refused with an OpenAI-shaped error: ``status``, ``message``, ``type``."""

    def __init__(self, status: int, message: str, typ: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, typ


def error_response(status: int, message: str, typ: str):
    """OpenAI's error body: {"error": {"message", "type", "code"}}."""
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": typ, "code": status}}, status_code=status)


def sse_error(message: str, typ: str = "server_error") -> str:
    """The last event of a stream that failed (OpenAI's clients raise it as an APIError), before ``[DONE]``."""
    return f"data: {json.dumps({'error': {'message': message, 'type': typ}})}\n\n"


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, or a 413 Refusal once it passes ``limit`` bytes (by Content-Length, or while reading a
    chunked body), so an oversized body is never held whole."""
    declared = request.headers.get("content-length")
    too_big = Refusal(413, f"the request body is over this server's limit of {limit} bytes; send less "
                           "(the server's --max-body-bytes)", "request_too_large")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise Refusal(400, "the Content-Length header is not a number") from None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def max_tokens_of(body: dict[str, Any], limit: int, default: int) -> int:
    """The request's ``max_tokens`` (or ``max_completion_tokens``), ``default`` when absent; a 400 Refusal when it
    is not a whole number in [1, limit]."""
    for k in MAX_TOKENS_FIELDS:
        v = body.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise Refusal(400, f"'{k}' must be a whole number >= 1")
        if v > limit:
            raise Refusal(400, f"'{k}' is {v}, over this server's limit of {limit}; ask for fewer tokens "
                               "(the server's --max-tokens-limit)")
        return v
    return min(default, limit)


def check_limits(max_body_bytes: int, max_tokens_limit: int) -> None:
    if max_body_bytes < 1024:
        raise EdgelmError(f"--max-body-bytes must be >= 1024, got {max_body_bytes}")
    if max_tokens_limit < 1:
        raise EdgelmError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")


def tls_options(host: str, cert: str, key: str) -> dict[str, str]:
    """uvicorn's ssl_certfile/ssl_keyfile for --tls-cert/--tls-key (both or neither, both readable). Without TLS on
    a non-loopback address, warn: the API keys travel in clear."""
    from edgelm.coop.api import is_loopback

    if bool(cert) != bool(key):
        raise EdgelmError("pass both --tls-cert and --tls-key (a PEM certificate and its private key), or neither")
    for flag, f in (("--tls-cert", cert), ("--tls-key", key)):
        if f and not Path(f).is_file():
            raise EdgelmError(f"{flag} {f}: no such file; pass a PEM file (e.g. made by `openssl req -x509 ...`)")
    if cert:
        import ssl

        try:  # a bad pair fails here in one line, not inside uvicorn's startup
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise EdgelmError(f"--tls-cert/--tls-key could not be loaded ({e}); pass a PEM certificate and the "
                              "private key that matches it") from None
        return {"ssl_certfile": cert, "ssl_keyfile": key}
    if not is_loopback(host):
        log.warning("serving %s over plain HTTP: API keys and prompts travel in clear; pass --tls-cert and "
                    "--tls-key (or put a TLS proxy in front)", host)
    return {}


async def detached_stream(it: Iterator[str], on_error: Callable[[BaseException], str]) -> AsyncIterator[str]:
    """Iterate ``it`` (a blocking generator that holds the device while it runs) in a thread of its own that never
    waits for the client: its items are queued here and sent at the client's pace, so a slow or stalled client
    cannot hold the device past the end of generation. When the client goes away (this async generator is closed
    or cancelled) the thread stops ``it`` at its next item and closes it, releasing what it holds at once.
    An exception from ``it`` becomes the item ``on_error(exc)``."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass

    def produce() -> None:
        try:
            for item in it:
                if stop.is_set():
                    break
                put(item)
        except BaseException as e:  # noqa: BLE001 - every failure becomes the stream's error event
            log.error("stream failed: %s: %s", type(e).__name__, e)
            log.debug("stream failure", exc_info=True)
            put(on_error(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # this thread runs it, so it can close it: its finally blocks run now
            put(end)

    threading.Thread(target=produce, name="edgelm-stream", daemon=True).start()
    try:
        while (item := await q.get()) is not end:
            yield item
    finally:
        stop.set()
