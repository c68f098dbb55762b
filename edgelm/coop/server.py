"""`edgelm serve`: an OpenAI-compatible server (FastAPI + uvicorn) over a CooperativeRuntime.

POST /v1/chat/completions and /v1/completions (``"stream": true`` for server-sent events), GET /v1/models, /health
and /metrics (Prometheus text, from prometheus_client). Request bodies are pydantic models. Each response carries
an ``edgelm`` object: routed_to, router score, threshold,
device and cloud latency, fallback reason. A request is private when its body has ``"edgelm": {"private": true}`` or
the header ``X-Edgelm-Private: 1``, or when the privacy guard flags its text.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional, Union

from fastapi import FastAPI, Request  # this module is imported only to serve (edgelm[serve])
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.coop.runtime import CooperativeRuntime

log = logging.getLogger(__name__)

SAMPLING = ("temperature", "top_p", "top_k", "seed", "repetition_penalty")


class BadRequest(Exception):
    pass


Number = Union[StrictInt, StrictFloat]  # JSON numbers; true/false and strings are refused
Word = Annotated[StrictStr, Field(min_length=1)]  # a non-empty string


class Message(BaseModel):
    role: StrictStr
    content: StrictStr


class _Body(BaseModel):
    """What both endpoints read; other fields OpenAI clients send (model, n, user, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    temperature: Optional[Annotated[Number, Field(ge=0)]] = None
    top_p: Optional[Number] = None
    top_k: Optional[Number] = None
    seed: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    stop: Optional[Union[Word, list[Word]]] = None
    stream: StrictBool = False
    edgelm: Optional[dict[str, Any]] = None  # {"private": true}

    def sampling(self) -> dict[str, Any]:
        """Generation options in edgelm's terms (temperature > 0 or top-p/top-k turn sampling on)."""
        out: dict[str, Any] = {k: v for k in SAMPLING if (v := getattr(self, k)) is not None}
        for k in ("top_k", "seed"):
            if k in out:
                out[k] = int(out[k])
        for k in ("top_p", "repetition_penalty"):
            if k in out:
                out[k] = float(out[k])
        t = out.pop("temperature", None)
        if t is not None and t > 0:
            out.update(do_sample=True, temperature=float(t))
        elif t is None and ("top_p" in out or "top_k" in out):
            out["do_sample"] = True
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return out


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionBody(_Body):
    prompt: Annotated[StrictStr, Field(min_length=1)]


def _reason(e: ValidationError) -> str:
    """The first problem, in the words the API documents (one line per field)."""
    err = e.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    if field == "messages":
        return ("each message needs a string 'role' and a string 'content'" if len(err["loc"]) > 2
                else "'messages' must be a non-empty list of {role, content}")
    if field == "prompt":
        return "'prompt' must be a non-empty string"
    if field in ("max_tokens", "max_completion_tokens"):
        return "'max_tokens' must be a whole number >= 1"
    if field == "temperature" and err["type"] == "greater_than_equal":
        return "'temperature' must be >= 0"
    if field in SAMPLING:
        return f"'{field}' must be a number"
    if field == "stop":
        return "'stop' must be a string or a list of non-empty strings"
    if field == "stream":
        return "'stream' must be true or false"
    if field == "edgelm":
        return "'edgelm' must be an object"
    return "the body must be a JSON object" if not field else f"'{field}': {err['msg']}"


def _parse(body: Any, kind: str) -> tuple[Any, int, dict[str, Any], bool, bool]:
    """(messages or prompt, max_tokens, sampling, stream, private) or BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        req = (ChatBody if kind == "chat" else CompletionBody).model_validate(body)
    except ValidationError as e:
        raise BadRequest(_reason(e)) from None
    request: Any = ([m.model_dump() for m in req.messages] if isinstance(req, ChatBody) else req.prompt)
    max_tokens = req.max_tokens or req.max_completion_tokens or 128
    return request, max_tokens, req.sampling(), req.stream, bool((req.edgelm or {}).get("private", False))


def create_app(coop: "CooperativeRuntime", *, model_name: str = "edgelm", api_key: str | None = None):
    """The FastAPI app. With ``api_key``, every path but /health needs ``Authorization: Bearer <key>`` (or
    ``x-api-key``), else 401."""
    from edgelm.coop.api import has_key
    from edgelm.coop.runtime import Busy, CoopStream

    app = FastAPI(title="edgelm cooperative runtime")

    def error(status: int, msg: str, typ: str) -> JSONResponse:
        return JSONResponse({"error": {"message": msg, "type": typ}}, status_code=status)

    if api_key:
        @app.middleware("http")
        async def check_key(req: Request, call_next):
            if req.url.path != "/health" and not has_key(req.headers, api_key):
                return error(401, "missing or wrong API key: send the server's key as 'Authorization: Bearer <key>'",
                             "authentication_error")
            return await call_next(req)

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
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(coop.metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)

    return app
