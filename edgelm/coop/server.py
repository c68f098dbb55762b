"""`edgelm serve`: an OpenAI-compatible server (FastAPI + uvicorn) over a CooperativeRuntime.

POST /v1/chat/completions and /v1/completions (``"stream": true`` for server-sent events), GET /v1/models, /health
and /metrics (Prometheus text). Each response carries an ``edgelm`` object: routed_to, router score, threshold,
device and cloud latency, fallback reason. A request is private when its body has ``"edgelm": {"private": true}`` or
the header ``X-Edgelm-Private: 1``, or when the privacy guard flags its text.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator

from fastapi import FastAPI, Request  # this module is imported only to serve (edgelm[serve])
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.coop.runtime import CooperativeRuntime

log = logging.getLogger(__name__)

SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "seed": int, "repetition_penalty": float}


class BadRequest(Exception):
    pass


def _parse(body: Any, kind: str) -> tuple[Any, int, dict[str, Any], bool, bool]:
    """(messages or prompt, max_tokens, sampling, stream, private) or BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content}")
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRequest("each message needs a string 'role' and a string 'content'")
        request: Any = [{"role": m["role"], "content": m["content"]} for m in msgs]
    else:
        request = body.get("prompt")
        if not isinstance(request, str) or not request:
            raise BadRequest("'prompt' must be a non-empty string")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 128))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("'max_tokens' must be a whole number >= 1")
    sampling: dict[str, Any] = {}
    for k, typ in SAMPLING.items():
        v = body.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRequest(f"'{k}' must be a number")
        sampling[k] = typ(v)
    if "temperature" in sampling:
        t = sampling.pop("temperature")
        if t < 0:
            raise BadRequest("'temperature' must be >= 0")
        if t > 0:
            sampling.update(do_sample=True, temperature=t)
    elif "top_p" in sampling or "top_k" in sampling:
        sampling["do_sample"] = True
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a string or a list of non-empty strings")
        sampling["stop"] = tuple(stop)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    ext = body.get("edgelm") or {}
    if not isinstance(ext, dict):
        raise BadRequest("'edgelm' must be an object")
    return request, max_tokens, sampling, stream, bool(ext.get("private", False))


def create_app(coop: "CooperativeRuntime", *, model_name: str = "edgelm"):
    from edgelm.coop.runtime import Busy, CoopStream

    app = FastAPI(title="edgelm cooperative runtime")

    def error(status: int, msg: str, typ: str) -> JSONResponse:
        return JSONResponse({"error": {"message": msg, "type": typ}}, status_code=status)

    def reply(kind: str, ans, created: int, rid: str) -> dict[str, Any]:
        choice = ({"index": 0, "message": {"role": "assistant", "content": ans.text}, "finish_reason": ans.finish_reason}
                  if kind == "chat" else {"index": 0, "text": ans.text, "finish_reason": ans.finish_reason})
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
                "model": model_name, "choices": [choice],
                "usage": {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
                          "total_tokens": ans.prompt_tokens + ans.completion_tokens},
                "edgelm": ans.metadata()}

    def chunk(kind: str, delta: str | None, created: int, rid: str, finish: str | None = None,
              meta: dict | None = None) -> str:
        if kind == "chat":
            choice = {"index": 0, "delta": {"content": delta} if delta is not None else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish}
        obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
               "created": created, "model": model_name, "choices": [choice]}
        if meta is not None:
            obj["edgelm"] = meta
        return f"data: {json.dumps(obj)}\n\n"

    async def handle(kind: str, req: Request):
        try:
            body = json.loads(await req.body() or b"null")
        except ValueError as e:
            return error(400, f"the body is not valid JSON ({e})", "invalid_request_error")
        try:
            request, max_tokens, sampling, stream, private = _parse(body, kind)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error")
        private = private or req.headers.get("x-edgelm-private", "").lower() in ("1", "true", "yes")
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        fn = coop.chat if kind == "chat" else coop.complete
        done = object()
        try:
            s: CoopStream = fn(request, max_tokens=max_tokens, private=private, stream=True, **sampling)
            it = iter(s)
            if not stream:
                def collect():
                    text = "".join(it)
                    s.answer.text = text
                    return s.answer

                return JSONResponse(reply(kind, await run_in_threadpool(collect), created, rid))
            first = await run_in_threadpool(next, it, done)  # queue full or bad input: an HTTP error, not a stream
        except Busy as e:
            return error(503, str(e), "overloaded")
        except EdgelmError as e:
            return error(400, str(e), "invalid_request_error")

        def events() -> Iterator[str]:
            try:
                if first is not done:
                    yield chunk(kind, first, created, rid)
                    for delta in it:
                        yield chunk(kind, delta, created, rid)
                a = s.answer
                yield chunk(kind, None, created, rid, a.finish_reason, a.metadata())
            except EdgelmError as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: Request):
        return await handle("chat", req)

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await handle("completion", req)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "edgelm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "device": str(coop.device.path), "runtime": coop.device.name,
                "router": coop.router.name, "threshold": coop.threshold if abs(coop.threshold) != float("inf") else str(coop.threshold),
                "cloud": coop.cloud.cfg.url if coop.cloud else None,
                "cloud_breaker_open": coop.cloud.breaker_open if coop.cloud else None}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(coop.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    return app
