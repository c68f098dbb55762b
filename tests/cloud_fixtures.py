"""A real cloud on loopback (llama-cpp-python's OpenAI-compatible server on the tiny GGUF) and the fault proxy in
front of it (edgelm.coop.localcloud.FaultProxy: refused connections, slow responses, 500s, malformed JSON, cut
streams), as fixtures."""
from __future__ import annotations

import json

import pytest

from edgelm.coop.localcloud import FaultProxy, LocalCloud, free_port, wait_http


@pytest.fixture(scope="session")
def cloud(artifacts, tmp_path_factory):
    srv = LocalCloud(artifacts["llamacpp"] / "model.gguf", tmp_path_factory.mktemp("cloud") / "server.log", n_ctx=512)
    yield srv
    srv.stop()


@pytest.fixture()
def proxy(cloud):
    p = FaultProxy(cloud.port)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def device(artifacts):
    from edgelm.runtimes.api import load

    rt = load(artifacts["llamacpp"], threads=1)
    yield rt
    rt.close()


def direct_chat(url: str, messages, max_tokens: int) -> str:
    """The server's own greedy answer. llama-cpp-python reuses the KV cache of the previous request's prompt prefix,
    which changes how the last prompt token is batched and so, on a random tiny model, can flip a near-tie: a test
    that compares an answer with this one first sends the same prompt here (so both requests follow the same one)."""
    import httpx

    r = httpx.post(f"{url}/chat/completions", json={"messages": messages, "max_tokens": max_tokens, "temperature": 0},
                   timeout=60)
    return r.json()["choices"][0]["message"]["content"]


__all__ = ["FaultProxy", "free_port", "wait_http", "direct_chat", "json"]
