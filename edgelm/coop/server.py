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
    """What both endpoints read; other fields OpenAI clients send (n, user, ...) are ignored. ``model`` picks a LoRA
    adapter by its --adapter name; the server's own name, or none, is the base."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # json.loads reads NaN and Infinity

    max_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    temperature: Optional[Annotated[Number, Field(ge=0)]] = None
    top_p: Optional[Number] = None
    top_k: Optional[Number] = None
    seed: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    stop: Optional[Union[Word, list[Word]]] = None
    stream: StrictBool = False
    model: Optional[StrictStr] = None
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
    if field == "model":
        return "'model' must be a string"
    return "the body must be a JSON object" if not field else f"'{field}': {err['msg']}"


def parse_request(body: Any, kind: str) -> tuple[Any, int, dict[str, Any], bool, bool, str | None]:
    """(messages or prompt, max_tokens, sampling, stream, private, model) or BadRequest with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        req = (ChatBody if kind == "chat" else CompletionBody).model_validate(body)
    except ValidationError as e:
        raise BadRequest(_reason(e)) from None
    request: Any = ([m.model_dump() for m in req.messages] if isinstance(req, ChatBody) else req.prompt)
    max_tokens = req.max_tokens or req.max_completion_tokens or 128
    return (request, max_tokens, req.sampling(), req.stream, bool((req.edgelm or {}).get("private", False)),
            req.model)


def create_app(coop: "CooperativeRuntime", *, model_name: str = "edgelm", api_key: str | None = None,
               max_body_bytes: int = 1 << 20, max_tokens_limit: int = 2048):
    """The FastAPI app. With ``api_key``, every path but /health needs ``Authorization: Bearer <key>`` (or
    ``x-api-key``), else 401. Bodies over ``max_body_bytes`` are a 413, ``max_tokens`` over ``max_tokens_limit`` a
    400; every error, streamed or not, is OpenAI's error JSON."""
    from starlette.exceptions import HTTPException

    from edgelm.coop.api import has_key
    from edgelm.coop.httpsafe import Refusal, detached_stream, error_response, read_body, sse_error
    from edgelm.coop.runtime import Busy, CoopStream

    app = FastAPI(title="edgelm cooperative runtime")
    error = error_response

    @app.exception_handler(HTTPException)
    async def http_error(req: Request, e: HTTPException):  # 404, 405: OpenAI's shape, not Starlette's
        return error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(req: Request, e: Exception):  # a bug, not the client's fault: one line in the log
        log.error("%s %s failed: %s: %s", req.method, req.url.path, type(e).__name__, e)
        return error(500, f"internal error ({type(e).__name__}); see the server's log", "server_error")

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
                "model": ans.adapter or model_name, "choices": [choice],
                "usage": {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.completion_tokens,
                          "total_tokens": ans.prompt_tokens + ans.completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": ans.cached_tokens}},
                "edgelm": ans.metadata()}

    def chunk(kind: str, delta: str | None, created: int, rid: str, finish: str | None = None,
              meta: dict | None = None, model: str | None = None) -> str:
        if kind == "chat":
            choice = {"index": 0, "delta": {"content": delta} if delta is not None else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish}
        obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
               "created": created, "model": model or model_name, "choices": [choice]}
        if meta is not None:
            obj["edgelm"] = meta
        return f"data: {json.dumps(obj)}\n\n"

    def stream_failed(e: BaseException) -> str:
        msg = str(e) if isinstance(e, EdgelmError) else f"internal error ({type(e).__name__}); see the server's log"
        return sse_error(msg) + "data: [DONE]\n\n"

    async def handle(kind: str, req: Request):
        try:
            raw = await read_body(req, max_body_bytes)
        except Refusal as e:
            return error(e.status, e.message, e.type)
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            return error(400, f"the body is not valid JSON ({e})", "invalid_request_error")
        try:
            request, max_tokens, sampling, stream, private, model = parse_request(body, kind)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error")
        adapters = coop.device.adapters
        # with adapters loaded, a name that is none of them is refused (not answered by the base); without, any
        # name is the one model, as llama-server takes it
        if adapters and model and model != model_name and model not in adapters:
            return error(404, f"the model {model!r} does not exist here; models: {', '.join([model_name, *adapters])}",
                         "invalid_request_error")
        adapter = model if model in adapters else None
        if max_tokens > max_tokens_limit:
            return error(400, f"'max_tokens' is {max_tokens}, over this server's limit of {max_tokens_limit}; ask "
                              "for fewer tokens (the server's --max-tokens-limit)", "invalid_request_error")
        private = private or req.headers.get("x-edgelm-private", "").lower() in ("1", "true", "yes")
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        fn = coop.chat if kind == "chat" else coop.complete
        done = object()
        s: CoopStream | None = None
        try:
            s = fn(request, max_tokens=max_tokens, private=private, stream=True, adapter=adapter, **sampling)
            it = iter(s)
            if not stream:
                def collect():
                    try:
                        text = "".join(it)
                    finally:
                        s.close()
                    s.answer.text = text
                    return s.answer

                return JSONResponse(reply(kind, await run_in_threadpool(collect), created, rid))
            first = await run_in_threadpool(next, it, done)  # queue full or bad input: an HTTP error, not a stream
        except Busy as e:
            return error(503, str(e), "overloaded")
        except EdgelmError as e:
            return error(400, str(e), "invalid_request_error")
        except Exception as e:  # noqa: BLE001 - a failure of ours is a 500 in OpenAI's shape, the device freed
            if s is not None:
                await run_in_threadpool(s.close)
            log.error("%s failed: %s: %s", req.url.path, type(e).__name__, e)
            log.debug("request failure", exc_info=True)
            return error(500, f"internal error ({type(e).__name__}); see the server's log", "server_error")

        def events() -> Iterator[str]:  # runs in detached_stream's thread, never waiting for the client
            try:
                if first is not done:
                    yield chunk(kind, first, created, rid, model=adapter)
                    for delta in it:
                        yield chunk(kind, delta, created, rid, model=adapter)
                a = s.answer
                yield chunk(kind, None, created, rid, a.finish_reason, a.metadata(), model=adapter)
                yield "data: [DONE]\n\n"
            finally:
                s.close()

        return StreamingResponse(detached_stream(events(), stream_failed), media_type="text/event-stream")

    chat_doc = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatBody"}}}}}
    completion_doc = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/CompletionBody"}}}}}

    @app.post("/v1/chat/completions", openapi_extra=chat_doc)
    async def chat_completions(req: Request):
        return await handle("chat", req)

    @app.post("/v1/completions", openapi_extra=completion_doc)
    async def completions(req: Request):
        return await handle("completion", req)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "edgelm",
                                            **({"parent": model_name} if m != model_name else {})}
                                           for m in [model_name, *coop.device.adapters]]}

    @app.get("/health")
    async def health():  # open to anyone who reaches the server: liveness only, nothing about the setup
        return {"status": "ok"}

    @app.get("/info")
    async def info():  # behind the key, as everything else: what this server runs
        return {"device": str(coop.device.path), "runtime": coop.device.name, "adapters": list(coop.device.adapters),
                "router": coop.router.name,
                "threshold": coop.threshold if abs(coop.threshold) != float("inf") else str(coop.threshold),
                "cloud": coop.cloud.cfg.url if coop.cloud else None,
                "cloud_breaker_open": coop.cloud.breaker_open if coop.cloud else None,
                "max_tokens_limit": max_tokens_limit, "max_body_bytes": max_body_bytes}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(coop.metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with the request bodies this server reads (so that schema-driven fuzzers send them)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            from pydantic.json_schema import models_json_schema

            schema = get_openapi(title=app.title, version="1", routes=app.routes)
            _, defs = models_json_schema([(ChatBody, "validation"), (CompletionBody, "validation")],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
