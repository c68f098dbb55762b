"""``edgelm bench --device browser[:PORT]``: any browser on any device runs the rows and posts them back.

edgelm builds the app with the artifacts (the page runs GGUF in wllama and ONNX in onnxruntime-web, as the app
does), serves it with its bench page (bench.html) through `edgelm app serve`'s server (cross-origin isolated, so
the runtimes may use threads), prints the URL and a QR code, and waits for ``--browsers`` browsers. Each asks for
the plan, runs every row and posts them; the table has one row per browser x artifact x threads.

Beyond loopback (a phone on the LAN: ``--host 0.0.0.0``) the page's requests need the key of `edgelm serve`
(EDGELM_SERVE_API_KEY); the URL carries it in its fragment, which browsers never send.
"""
from __future__ import annotations

import json
import logging
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgelm.bench.config import BenchConfig
from edgelm.bench.devices import BenchDevice
from edgelm.errors import EdgelmError
from edgelm.registry import DEVICES

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
MAX_POST_BYTES = 1 << 20  # a page's facts or one row: far less
PROMPT_CHARS = 16384  # of the split's text: enough for any --prompt-len the page's tokenizer cuts it to
ROW_KEYS = ("model", "threads", "load_s", "page_memory_bytes", "notes", "error", "test_time")  # what a page posts
TIMINGS = ("prefill_s", "ttft_s", "decode_s", "sustained_decode_s")  # per run, seconds


def lan_address() -> str:
    """This machine's address on its LAN, for the URL a phone opens (a UDP socket's route; no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def page_row(posted: dict[str, Any], gen_len: int) -> dict[str, Any]:
    """A row from what the page posted: its fields, and the figures computed here from its seconds."""
    from edgelm.bench.devices import timed_row

    row = {k: posted.get(k) for k in ROW_KEYS}
    t = posted.get("timings")
    if not row.get("error"):
        seconds = {k: [float(x) for x in t[k]] for k in TIMINGS}
        row.update({k: v for k, v in timed_row(int(t["n_prompt"]), gen_len,
                                               {**seconds, "threads": row["threads"], "load_s": row["load_s"]}).items()})
    return row


class _Session:
    """What the browsers asked and posted, guarded by a lock (uvicorn's thread writes, the CLI's reads)."""

    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()
        self.expected = expected
        self.facts: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.done: dict[str, str | None] = {}  # browser -> None, or the page's error

    def new_browser(self) -> str | None:
        with self.lock:
            if len(self.facts) >= self.expected:
                return None
            bid = f"browser-{len(self.facts) + 1}"
            self.facts[bid] = {"id": bid}
            self.rows[bid] = []
            return bid


@DEVICES.register
class BrowserDevice(BenchDevice):
    name = "browser"
    formats = ("gguf", "onnx")

    def __init__(self, config: BenchConfig, port: int, key: str | None) -> None:
        self.config, self.port, self.key = config, port, key
        self.session = _Session(config.browsers)
        self.server = None
        self.tmp = tempfile.TemporaryDirectory(prefix="edgelm-bench-page-")

    @classmethod
    def open(cls, config: BenchConfig) -> BrowserDevice:
        from edgelm.cloud import read_key
        from edgelm.coop.api import is_loopback

        spec = config.device
        port_s = spec.split(":", 1)[1] if ":" in spec else str(DEFAULT_PORT)
        if spec.split(":", 1)[0] != "browser" or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise EdgelmError(f"--device {spec!r}: write browser or browser:PORT (a port from 1 to 65535)")
        key = read_key(config.serve_key_env, config.serve_key_file)
        if key is None and not is_loopback(config.host) and not config.insecure:
            raise EdgelmError(f"--host {config.host} lets any device on the network reach the bench page; set "
                              f"{config.serve_key_env} (or --serve-key-file) to a key, which the printed URL "
                              "carries, or pass --insecure")
        return cls(config, int(port_s), key)

    def check(self, specs: list[dict[str, Any]]) -> None:
        super().check(specs)
        if self.config.runtimes:
            raise EdgelmError("--device browser runs GGUF in wllama and ONNX in onnxruntime-web; drop --runtimes")

    def facts(self) -> list[dict[str, Any]]:
        return [{"kind": self.name, **f} for f in self.session.facts.values()]

    # ---- the page's server -------------------------------------------------------------------------------------
    def _routes(self, plan: dict[str, Any]) -> list:
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from edgelm.coop.api import has_key
        from edgelm.coop.httpsafe import Refusal, read_body

        s = self.session

        def refused(req: Request) -> JSONResponse | None:
            if self.key and not has_key(req.headers, self.key):
                return JSONResponse({"error": "missing or wrong key: open the URL edgelm bench printed"}, 401)
            return None

        async def get_plan(req: Request):
            bad = refused(req)
            if bad:
                return bad
            bid = s.new_browser()
            if bid is None:
                return JSONResponse({"error": f"this run waits for {s.expected} browser(s), all connected"}, 409)
            log.info("%s connected", bid)
            return JSONResponse({**plan, "browser": bid})

        async def post(req: Request):
            bad = refused(req)
            if bad:
                return bad
            what = req.path_params["what"]
            try:
                body = json.loads(await read_body(req, MAX_POST_BYTES))
            except Refusal as e:
                return JSONResponse({"error": e.message}, e.status)
            except ValueError:
                return JSONResponse({"error": "the body is not JSON"}, 400)
            bid = body.get("browser") if isinstance(body, dict) else None
            if what not in ("hello", "row", "done") or (bid not in s.rows and what != "done"):
                return JSONResponse({"error": "unknown browser or message"}, 400)
            with s.lock:
                if what == "hello" and isinstance(body.get("facts"), dict):
                    s.facts[bid] = {**{k: v for k, v in body["facts"].items() if isinstance(k, str)}, "id": bid}
                elif what == "row" and isinstance(body.get("row"), dict):
                    if body["row"].get("model") not in plan["models"]:
                        return JSONResponse({"error": "a row of a model this run did not plan"}, 400)
                    try:
                        row = page_row(body["row"], plan["gen_len"])
                    except (KeyError, TypeError, ValueError, ZeroDivisionError):
                        return JSONResponse({"error": "a row without its timings"}, 400)
                    s.rows[bid].append(row)
                    log.info("%s: %s, %s thread(s): %s tok/s", bid, row["model"], row["threads"], row.get("tg_tps_mean"))
                    return JSONResponse(row)
                elif what == "done" and bid in s.rows:
                    s.done[bid] = body.get("error")
            return JSONResponse({"ok": True})

        return [Route("/edgelm-bench/plan", get_plan), Route("/edgelm-bench/{what}", post, methods=["POST"])]

    def _serve(self, app_dir: Path, plan: dict[str, Any]) -> str:
        import uvicorn

        from edgelm.app.serve import create_server

        app = create_server(app_dir, api_key=self.key, routes=self._routes(plan), isolation=self.config.isolation)
        config = uvicorn.Config(app, host=self.config.host, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        thread = threading.Thread(target=self.server.run, daemon=True, name="edgelm-bench-page")
        thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise EdgelmError(f"could not serve the bench page on {self.config.host}:{self.port} (is the port "
                                  "in use? pass --device browser:PORT with a free one)")
            time.sleep(0.05)
        host = lan_address() if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.port}/bench.html" + (f"#key={self.key}" if self.key else "")

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.tmp.cleanup()

    # ---- the run -----------------------------------------------------------------------------------------------
    def run(self, specs: list[dict[str, Any]], config: BenchConfig) -> list[dict[str, Any]]:
        from edgelm.app.build import build_app
        from edgelm.coop.api import is_loopback
        from edgelm.coop.routers import RouterState
        from edgelm.data.corpus import Corpus, CorpusSpec

        live = {s["path"]: s for s in specs if not s.get("error")}
        tmp = Path(self.tmp.name)
        RouterState("always-device", float("inf")).save(tmp / "router.json")  # the page's router is not measured
        build = build_app(artifacts=tuple(live), out=str(tmp / "app"), router=str(tmp / "router.json"))
        names = {m["name"]: p for m, p in zip(build.models, live)}
        text = ""
        for doc in Corpus(CorpusSpec(config.data)).texts(config.split):
            text += doc
            if len(text) >= PROMPT_CHARS:
                break
        plan = {"models": list(names), "threads": list(config.threads), "prompt": text[:PROMPT_CHARS],
                "prompt_len": config.prompt_len, "gen_len": config.gen_len, "repeat": config.repeat,
                "sustained": config.sustained}
        url = self._serve(tmp / "app", plan)
        if not is_loopback(config.host):
            log.warning("the bench page listens on %s: any device on this network can reach it (the results need "
                        "the key in the URL); plain HTTP", config.host)
        announce(url, config.browsers)
        rows = self._wait(len(names) * max(1, len(config.threads)), config)
        out = [dict(s, device="(none)") for s in specs if s.get("error")]
        for bid, got in rows.items():
            for r in got:
                s = live[names[r["model"]]]
                out.append({**s, **{k: v for k, v in r.items() if v is not None}, "device": bid,
                            "runtime": "wllama" if s["format"] == "gguf" else "onnxruntime-web",
                            "size_bytes": next(m["bytes"] for m in build.models if m["name"] == r["model"])})
        return out

    def _wait(self, n_rows: int, config: BenchConfig) -> dict[str, list[dict[str, Any]]]:
        """Every browser's rows once each has posted done; one-line errors for none connecting in --wait seconds,
        a page that failed, or rows that take over --timeout each."""
        from tqdm import tqdm

        s = self.session
        end = time.monotonic() + config.wait
        while len(s.facts) < s.expected:
            if time.monotonic() > end:
                raise EdgelmError(f"{len(s.facts)} of {s.expected} browser(s) opened the bench page within "
                                  f"{config.wait:.0f} s (--wait); open the URL above, or raise --wait")
            time.sleep(0.1)
        bar = tqdm(total=n_rows * s.expected, desc="browser rows", unit="row", disable=not config.progress)
        end = time.monotonic() + config.timeout * n_rows
        seen = 0
        while len(s.done) < s.expected:
            with s.lock:
                now = sum(len(r) for r in s.rows.values())
                failed = {b: e for b, e in s.done.items() if e}
            bar.update(now - seen)
            seen = now
            if failed:
                b, e = next(iter(failed.items()))
                raise EdgelmError(f"the bench page in {b} stopped: {e}")
            if time.monotonic() > end:
                raise EdgelmError(f"the browsers posted {now} of {n_rows * s.expected} rows within the --timeout of "
                                  f"{config.timeout:.0f} s per row; keep the page in front, or raise --timeout")
            time.sleep(0.2)
        bar.close()
        return {b: list(r) for b, r in s.rows.items()}


def announce(url: str, browsers: int) -> None:
    """The URL, and a QR code of it for a phone's camera, on stderr (stdout keeps the table)."""
    import sys

    msg = f"open {url} in {browsers} browser(s) (a phone: scan the code)"
    try:
        import segno

        qr = segno.make(url, error="l")
        import io

        buf = io.StringIO()
        qr.terminal(out=buf, compact=True)
        msg = buf.getvalue() + msg
    except ImportError:
        pass
    print(msg, file=sys.stderr, flush=True)
