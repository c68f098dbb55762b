"""Fixtures of the fine-tuning tests: a new domain (numpy's Python source, which the tiny models never saw) and a
LoRA adapter trained on it once per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DOMAIN_FILES = 40
CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8, threads=1)  # small export checks


@pytest.fixture(scope="session")
def tiny_domain(tmp_path_factory) -> Path:
    """numpy's .py files (2-40 kB), split by file as the stdlib corpus is."""
    import numpy

    out = tmp_path_factory.mktemp("domain")
    root = Path(numpy.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if 2_000 < p.stat().st_size < 40_000 and "tests" not in p.parts)
    for p in files[:DOMAIN_FILES]:
        shutil.copy(p, out / f"{p.parent.name}_{p.name}")
    return out


def ft_args(model, domain, out, **kw) -> dict:
    base = dict(model=str(model), data=(str(domain),), seq_len=64, batch_size=4, max_steps=8, rank=4,
                lora_alpha=8.0, lora_dropout=0.0, warmup_steps=1, eval_every=4, ckpt_every=4, eval_seqs=8,
                out=str(out), progress=False, threads=1, bf16="off")
    base.update(kw)
    return base


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_teacher, tiny_domain):
    """A rank-4 LoRA adapter of tiny_teacher on the domain (32 steps at a tiny model's learning rate)."""
    from edgelm.finetune.api import finetune

    return finetune(**ft_args(tiny_teacher, tiny_domain, tmp_path_factory.mktemp("lora-run"), max_steps=32,
                              lr=1e-2, lora_alpha=8.0, ckpt_every=0, eval_every=0))


@pytest.fixture(scope="session")
def gguf_base(tmp_path_factory, tiny_teacher, tiny_domain):
    """tiny_teacher as an fp32 GGUF artifact."""
    from edgelm.artifact.api import export

    out = tmp_path_factory.mktemp("base") / "gguf"
    export(model=str(tiny_teacher), target="gguf", quant="fp32", out=out, data=(str(tiny_domain),), **CHECK)
    return out


@pytest.fixture(scope="session")
def gguf_adapter(tmp_path_factory, lora_run, gguf_base, tiny_domain):
    from edgelm.artifact.api import export

    out = tmp_path_factory.mktemp("adapter") / "gguf"
    res = export(model=str(lora_run.student_dir), base=str(gguf_base), out=out, data=(str(tiny_domain),), **CHECK)
    return out, res


@pytest.fixture(scope="session")
def onnx_base(tmp_path_factory, tiny_teacher, tiny_domain, lora_run):
    """tiny_teacher as an fp32 ONNX artifact with LoRA inputs shaped like lora_run's adapter."""
    from edgelm.artifact.api import export

    out = tmp_path_factory.mktemp("base") / "onnx"
    export(model=str(tiny_teacher), target="onnx", quant="fp32", out=out, data=(str(tiny_domain),),
           lora_like=str(lora_run.student_dir), **CHECK)
    return out
