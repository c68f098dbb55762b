"""`edgelm app serve`: the app folder over HTTP, and a /v1 proxy to the cloud.

Every response carries COOP/COEP (cross-origin isolation: the runtimes may use threads) and the MIME types the
runtimes need. The page talks to the cloud through /v1 on its own origin, so no CORS is needed and the cloud's key
stays on this machine: the proxy adds it. Bound beyond loopback, /v1 needs the server's own key (as `edgelm serve`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from edgelm.app.config import AppServeConfig
from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
NO_CACHE = ("/", "/index.html", "/app.json", "/sw.js")  # the service worker decides what is cached, not the HTTP cache
# The OpenAI paths the page uses, and their methods: nothing else reaches the cloud with the user's key.
CLOUD_PATHS = {"chat/completions": "POST", "completions": "POST", "models": "GET"}
FORWARD_REQUEST = ("content-type", "accept")  # request headers the cloud needs; the key is added here
FORWARD_RESPONSE = ("content-type", "cache-control", "x-request-id", "openai-processing-ms")  # and back to the page
for _ext, _type in ((".mjs", "text/javascript"), (".js", "text/javascript"), (".wasm", "application/wasm"),
                    (".webmanifest", "application/manifest+json"), (".gguf", "application/octet-stream"),
                    (".onnx", "application/octet-stream"), (".data", "application/octet-stream")):
    mimetypes.add_type(_type, _ext)


def check_app(folder: str | Path) -> dict[str, Any]:
    """The app folder's manifest, every file's sha256 checked; a one-line error for anything else."""
    from edgelm.manifest import read_manifest

    m = read_manifest(folder) if Path(folder).is_dir() else None
    if m is None or m.get("kind") != "app":
        raise EdgelmError(f"{folder} is not an app folder; write one with `edgelm app build ARTIFACT... --out DIR`")
    return m


def create_server(folder: str | Path, *, cloud: str = "", cloud_key: str | None = None, api_key: str | None = None,
                  cors_origins: tuple[str, ...] = (), max_body_bytes: int = 1 << 20, max_tokens_limit: int = 2048,
                  routes: Sequence[Any] = (), isolation: bool = True):
    """The Starlette app: static files from ``folder``, the OpenAI paths of /v1 proxied to ``cloud``,
    /edgelm-serve.json for the page. ``cors_origins``: pages elsewhere that may call it (the Android app's WebView is
    http://localhost). Bodies over ``max_body_bytes`` are a 413; a completion's ``max_tokens`` over
    ``max_tokens_limit`` is a 400, and one that asks for none is sent with that limit. ``routes``: more Starlette
    routes, before the static files (the bench page's). ``isolation`` False leaves out COOP/COEP, as a plain web host
    would (the page then runs its runtimes on one thread)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.datastructures import MutableHeaders
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from edgelm.coop.api import has_key
    from edgelm.coop.httpsafe import Refusal, error_response, max_tokens_of, read_body

    error = error_response
    upstream = cloud.rstrip("/") + "/" if cloud else ""
    client = httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0)) if cloud else None

    async def request_body(req: Request, path: str) -> bytes:
        raw = await read_body(req, max_body_bytes)
        if req.method != "POST":
            return b""
        try:
            body = json.loads(raw)
        except ValueError:
            raise Refusal(400, "the body is not valid JSON") from None
        from edgelm.coop.server import BadRequest, parse_request

        try:  # the rules of `edgelm serve`: a body the cloud would choke on is a 400 here, and never leaves
            parse_request(body, "chat" if path == "chat/completions" else "completion")
        except BadRequest as e:
            raise Refusal(400, str(e)) from None
        body["max_tokens"] = max_tokens_of(body, max_tokens_limit, max_tokens_limit)  # never unbounded upstream
        body.pop("max_completion_tokens", None)
        return json.dumps(body).encode()

    async def proxy(req: Request):
        path = req.path_params["path"]
        if path not in CLOUD_PATHS:  # exact match on the decoded path: no traversal, no other endpoint
            return error(404, f"/v1/{path} is not proxied; the app's cloud paths are "
                              + ", ".join(f"{m} /v1/{p}" for p, m in CLOUD_PATHS.items()), "invalid_request_error")
        if req.method != CLOUD_PATHS[path]:
            return error(405, f"/v1/{path} takes {CLOUD_PATHS[path]}, not {req.method}", "invalid_request_error")
        if api_key and not has_key(req.headers, api_key):
            return error(401, "missing or wrong API key: enter this server's key in the app's settings",
                         "authentication_error")
        if client is None:
            return error(503, "no cloud is configured: start `edgelm app serve` with --cloud URL", "no_cloud")
        try:
            content = await request_body(req, path)
        except Refusal as e:
            return error(e.status, e.message, e.type)
        headers = {k: v for k, v in req.headers.items() if k.lower() in FORWARD_REQUEST}
        if cloud_key:
            headers["authorization"] = f"Bearer {cloud_key}"
        try:  # the URL is the allowed path's, never the request's; no query string is forwarded
            r = await client.send(client.build_request(req.method, upstream + path, headers=headers,
                                                       content=content or None), stream=True)
        except httpx.HTTPError as e:
            return error(502, f"the cloud at {cloud} did not answer ({type(e).__name__})", "cloud_unreachable")

        async def body():
            try:
                async for part in r.aiter_bytes():  # decoded: gzip, deflate (and br, zstd when installed)
                    yield part
            except httpx.HTTPError:  # a cut stream ends the page's stream; the page falls back on the device
                pass
            finally:
                await r.aclose()

        if r.status_code >= 500:  # the cloud's failure is a 502 from here, in OpenAI's shape (the page falls back)
            await r.aclose()
            return error(502, f"the cloud at {cloud} failed (HTTP {r.status_code})", "cloud_error")
        keep = {k: v for k, v in r.headers.items() if k.lower() in FORWARD_RESPONSE}
        return StreamingResponse(body(), status_code=r.status_code, headers=keep)

    async def info(req: Request):
        return JSONResponse({"cloud": bool(cloud), "key_required": bool(api_key)})

    async def openapi(req: Request):
        return JSONResponse(openapi_schema())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if client is not None:
            await client.aclose()

    def isolate(app):
        """ASGI wrapper: the isolation headers on every response, no-cache on the app's entry files."""
        async def wrapped(scope, receive, send):
            async def send_with_headers(msg):
                if msg["type"] == "http.response.start":
                    h = MutableHeaders(scope=msg)
                    if isolation:
                        h.update(ISOLATION)
                    if scope["path"] in NO_CACHE:
                        h["Cache-Control"] = "no-cache"
                await send(msg)

            await app(scope, receive, send_with_headers if scope["type"] == "http" else send)

        return wrapped

    methods = sorted(set(CLOUD_PATHS.values()) | {"PUT", "DELETE", "PATCH"})  # others reach proxy() for a 405
    return Starlette(routes=[Route("/v1/{path:path}", proxy, methods=methods),
                             Route("/edgelm-serve.json", info),
                             Route("/openapi.json", openapi),
                             *routes,
                             Mount("/", StaticFiles(directory=str(folder), html=True))],
                     middleware=[Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                            allow_methods=["GET", "POST"], allow_headers=["authorization",
                                                                                          "content-type", "x-api-key"]),
                                 Middleware(isolate)], lifespan=lifespan)


def openapi_schema() -> dict[str, Any]:
    """The proxy's OpenAPI document: its paths and methods, with the request bodies of `edgelm serve` (the same
    pydantic models), so schema-driven fuzzers (schemathesis) test both servers alike."""
    from pydantic.json_schema import models_json_schema

    from edgelm.coop.server import ChatBody, CompletionBody

    _, defs = models_json_schema([(ChatBody, "validation"), (CompletionBody, "validation")],
                                 ref_template="#/components/schemas/{model}")
    ok = {"200": {"description": "the cloud's answer, or an OpenAI error"}}

    def post(model: str) -> dict[str, Any]:
        return {"post": {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model}"}}}}, "responses": ok}}

    return {"openapi": "3.1.0", "info": {"title": "edgelm app serve", "version": "1"},
            "paths": {"/v1/chat/completions": post("ChatBody"), "/v1/completions": post("CompletionBody"),
                      "/v1/models": {"get": {"responses": ok}}, "/edgelm-serve.json": {"get": {"responses": ok}}},
            "components": {"schemas": defs.get("$defs", {})}}


def serve_app(config: AppServeConfig | None = None, **kwargs: Any) -> None:
    """Serve the app folder until interrupted."""
    c = replace(config or AppServeConfig(), **kwargs)
    try:
        import uvicorn
    except ImportError:
        raise EdgelmError("serving needs uvicorn and starlette; pip install 'edgelm[serve]'") from None
    from edgelm.coop.api import inbound_key
    from edgelm.cloud import read_key

    if c.cloud and not c.cloud.startswith(("http://", "https://")):
        raise EdgelmError(f"--cloud {c.cloud!r} must start with http:// or https:// (e.g. http://127.0.0.1:8080/v1)")
    from edgelm.coop.httpsafe import check_limits, tls_options

    check_limits(c.max_body_bytes, c.max_tokens_limit)
    m = check_app(c.folder)
    key = inbound_key(c)
    tls = tls_options(c.host, c.tls_cert, c.tls_key)
    app = create_server(c.folder, cloud=c.cloud, cloud_key=read_key(c.api_key_env, c.api_key_file), api_key=key,
                        cors_origins=c.cors_origin, max_body_bytes=c.max_body_bytes,
                        max_tokens_limit=c.max_tokens_limit)
    log.info("app (%s) on %s://%s:%d/ ; cloud: %s", ", ".join(m.get("models", [])), "https" if tls else "http",
             c.host, c.port, c.cloud or "none (device only)")
    uvicorn.run(app, host=c.host, port=c.port, log_level="warning", **tls)
