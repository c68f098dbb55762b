"""`edgelm serve --adapter NAME=PATH`: one base, several adapters, the OpenAI `model` field picks one per request
(the openai client on 127.0.0.1, against a real server)."""
from __future__ import annotations

import pytest

from tests.coop.test_server import Served
from tests.finetune.conftest import CHECK


@pytest.fixture(scope="session")
def second_adapter(tmp_path_factory, tiny_teacher, tiny_corpus, gguf_base):
    """Another adapter of the same base, on the stdlib, exported for the same GGUF."""
    from edgelm.artifact.api import export
    from edgelm.finetune.api import finetune
    from tests.finetune.conftest import ft_args

    run = finetune(**ft_args(tiny_teacher, tiny_corpus, tmp_path_factory.mktemp("lora-b"), rank=2, max_steps=8,
                             lr=2e-2, targets=("q_proj", "v_proj", "down_proj"), ckpt_every=0, eval_every=0))
    out = tmp_path_factory.mktemp("adapter-b") / "gguf"
    export(model=str(run.student_dir), base=str(gguf_base), out=out, data=(str(tiny_corpus),), **CHECK)
    return out


def test_serve_switches_adapters_per_request(gguf_base, gguf_adapter, second_adapter):
    import httpx
    from openai import NotFoundError, OpenAI

    from edgelm.runtimes.api import load

    prompt = "import numpy as np\n\ndef"
    want = {}
    with load(gguf_base, threads=1, adapters={"numpy": gguf_adapter[0], "stdlib": second_adapter}) as rt:
        for name in ("numpy", "stdlib", None):
            rt.set_adapter(name)
            want[name] = rt.generate(prompt, max_new_tokens=10).text
    assert len(set(want.values())) == 3, "the three weights answer differently"

    s = Served("--device", str(gguf_base), "--router", "always-device", "--threads", "1",
               "--adapter", f"numpy={gguf_adapter[0]}", "--adapter", f"stdlib={second_adapter}")
    try:
        client = OpenAI(base_url=f"{s.url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["edgelm", "numpy", "stdlib"]

        def ask(model):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
            return r, r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

        r, text, _ = ask("numpy")
        assert text == want["numpy"] and r.model == "numpy" and r.model_extra["edgelm"]["adapter"] == "numpy"
        _, text, cached = ask("numpy")
        assert text == want["numpy"] and cached > 0, "the same adapter keeps its KV cache"
        _, text, cached = ask("stdlib")
        assert text == want["stdlib"] and cached == 0, "a switch costs one prefill"
        r, text, _ = ask("edgelm")
        assert text == want[None] and r.model == "edgelm" and r.model_extra["edgelm"]["adapter"] is None
        chunks = list(client.completions.create(model="numpy", prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want["numpy"] and chunks[0].model == "numpy"
        with pytest.raises(NotFoundError, match="the model 'legal' does not exist here; models: edgelm, numpy"):
            client.completions.create(model="legal", prompt=prompt, max_tokens=4)
        info = httpx.get(f"{s.url}/info", timeout=10).json()
        assert info["adapters"] == ["numpy", "stdlib"]
    finally:
        log = s.stop()
    assert "Traceback" not in log


def test_serve_refuses_a_bad_adapter_spec_in_one_line(gguf_base, gguf_adapter, tmp_path):
    from edgelm.coop.api import build_runtime
    from edgelm.errors import EdgelmError
    from tests.conftest import run_cli

    r = run_cli("serve", "--device", str(gguf_base), "--router", "always-device", "--adapter", str(gguf_adapter[0]))
    assert r.returncode != 0 and "write NAME=PATH" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(EdgelmError, match="is not a gguf adapter artifact"):
        build_runtime(device=str(gguf_base), router="always-device", adapter=(f"x={tmp_path}",))
    with pytest.raises(EdgelmError, match="the name 'x' is given twice"):
        build_runtime(device=str(gguf_base), router="always-device",
                      adapter=(f"x={gguf_adapter[0]}", f"x={gguf_adapter[0]}"))
