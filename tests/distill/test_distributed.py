"""torchrun on the CPU with the gloo backend, 2 processes: the same global batch gives the same student."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edgelm.distill.api import distill
from edgelm.manifest import read_manifest
from tests.distill.test_trainer import _args, _cli_args


def _torchrun(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "edgelm", "distill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_teacher, tiny_corpus, tmp_path, mode):
    common = dict(max_steps=6, eval_every=3, ckpt_every=3, intermediate_size=256)
    single = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "single", batch_size=4, **common))
    args = _cli_args(_args(tiny_teacher, tiny_corpus, tmp_path / mode, batch_size=2, fsdp=mode == "fsdp", **common))
    r = _torchrun(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_manifest(tmp_path / mode / "student")
    assert m["training"]["world_size"] == 2
    assert m["training"]["tokens_seen"] == single.tokens_seen
    a = load_file(single.student_dir / "model.safetensors")
    b = load_file(tmp_path / mode / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
