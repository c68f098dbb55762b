from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from edgelm.distill.api import distill
from edgelm.errors import EdgelmError, TrainingDiverged
from edgelm.manifest import read_manifest
from tests.conftest import kill_when, run_cli


def _args(teacher, corpus, out, **kw) -> dict:
    base = dict(teacher=str(teacher), data=(str(corpus),), layers=2, intermediate_size=128, seq_len=64, batch_size=4,
                max_steps=12, lr=2e-3, warmup_steps=2, eval_every=4, ckpt_every=4, eval_seqs=8, out=str(out),
                progress=False, threads=1, bf16="off")
    base.update(kw)
    return base


def _cli_args(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        if k == "progress":
            out += [] if v else ["--no-progress"]
        elif isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, tuple):
            out += [flag, *v]
        else:
            out += [flag, str(v)]
    return out


def test_distill_improves_the_student_and_writes_a_manifest(tiny_teacher, tiny_corpus, tmp_path):
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "run"))
    recs = [json.loads(ln) for ln in res.metrics_path.read_text().splitlines()]
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["val_ppl"] < evals[0]["val_ppl"], "KD should improve the pruned student"
    assert res.val_student.ppl == pytest.approx(evals[-1]["val_ppl"])
    m = read_manifest(res.student_dir)
    assert m["kind"] == "student"
    assert m["training"]["steps"] == 12 and m["training"]["tokens_seen"] == 12 * 4 * 64
    assert m["val"]["teacher"]["ppl"] == pytest.approx(res.val_teacher.ppl)
    assert m["student"]["layers"] == 2 and len(m["student"]["kept_layers"]) == 2
    assert set(m["data"]["splits"]) == {"train", "val", "test"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(m["files"])
    assert not list(res.run_dir.glob(".*tmp*")), "no temp folders left behind"


def test_kill_and_resume_gives_the_same_weights(tiny_teacher, tiny_corpus, tmp_path):
    """A run SIGKILLed after its first checkpoint, then resumed, ends bit-identical to an uninterrupted run."""
    full = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "full"))
    args = _cli_args(_args(tiny_teacher, tiny_corpus, tmp_path / "killed"))
    ckpt = tmp_path / "killed" / "checkpoints" / "step-0000004"
    kill_when(["distill", *args], ckpt)
    assert not (tmp_path / "killed" / "student").exists()
    r = run_cli("distill", *args, "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(full.student_dir / "model.safetensors")
    b = load_file(tmp_path / "killed" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["event"] == "train"]
    assert steps == list(range(1, 13)), "metrics keep one record per step after resume"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["stream"]["doc"] > 0 and state["seqs_done"] == 4 * 4  # the stream's place, not a count to replay


def test_a_checkpoint_without_a_stream_state_resumes_by_replaying(tiny_teacher, tiny_corpus, tmp_path, caplog):
    """Checkpoints written before stream positions were kept still resume bit-identically."""
    import shutil

    kw = dict(max_steps=8, ckpt_every=4, eval_every=0, keep_ckpts=5)
    full = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "full", **kw))
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    shutil.rmtree(cut / "student")
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-0000004"]
    path = cut / "checkpoints" / "step-0000004" / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["stream"]
    torch.save(state, path)
    with caplog.at_level("INFO", logger="edgelm.distill.trainer"):
        resumed = distill(**_args(tiny_teacher, tiny_corpus, cut, resume=True, **kw))
    assert "replaying 16 sequences" in caplog.text
    a, b = load_file(full.student_dir / "model.safetensors"), load_file(resumed.student_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_config_is_refused(tiny_teacher, tiny_corpus, tmp_path):
    first = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=6))  # checkpoint at step 4
    # a finished run: --resume returns its result and trains nothing
    files = {f: f.stat().st_mtime_ns for f in (tmp_path / "r").rglob("*") if f.is_file()}
    again = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=6, resume=True, threads=2))
    assert (again.steps, again.val_student, again.val_teacher) == (6, first.val_student, first.val_teacher)
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "r").rglob("*") if f.is_file()} == files
    with open(tmp_path / "r" / "student" / "config.json", "a") as f:  # a damaged student is not taken as finished
        f.write(" ")
    with pytest.raises(EdgelmError, match="config.json does not match the sha256"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=6, resume=True))
    (tmp_path / "r" / "student" / "config.json").write_text(
        (tmp_path / "r" / "student" / "config.json").read_text()[:-1])
    with pytest.raises(EdgelmError, match=r"different config \(lr: 0.002 -> 0.001; seq_len: 64 -> 32\)"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=6, lr=1e-3, seq_len=32, resume=True))


def test_existing_run_needs_resume_or_force(tiny_teacher, tiny_corpus, tmp_path):
    distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=4))
    before = (tmp_path / "r" / "student" / "model.safetensors").read_bytes()
    with pytest.raises(EdgelmError, match="already holds a run"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=4))
    assert (tmp_path / "r" / "student" / "model.safetensors").read_bytes() == before
    distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=4, force=True, seed=1))
    assert (tmp_path / "r" / "student" / "model.safetensors").read_bytes() != before


def test_resume_without_checkpoint_is_refused(tiny_teacher, tiny_corpus, tmp_path):
    with pytest.raises(EdgelmError, match="no checkpoint"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", resume=True))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_teacher, tiny_corpus, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"the last good checkpoint is .*step-\d{7}") as e:
        distill(**_args(tiny_teacher, tiny_corpus, out, max_steps=40, lr=1e6, warmup_steps=0, grad_clip=0,
                        ckpt_every=1, eval_every=0, loss="reverse_kl"))
    assert not (out / "student").exists()
    ckpts = sorted((out / "checkpoints").iterdir())
    bad_step = int(str(e.value).split(" at step ")[1].split(";")[0])
    assert ckpts and ckpts[-1].name == f"step-{bad_step - 1:07d}", "the checkpoint just before the divergence is kept"
    state = torch.load(ckpts[-1] / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_via_cli_is_one_line_with_exit_code(tiny_teacher, tiny_corpus, tmp_path):
    args = _cli_args(_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=40, lr=1e6, warmup_steps=0,
                           grad_clip=0, eval_every=0, loss="reverse_kl"))
    r = run_cli("distill", *args)
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgelm: error: loss became")


def test_ctrl_c_writes_a_checkpoint(tiny_teacher, tiny_corpus, tmp_path):
    args = _cli_args(_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=100000, ckpt_every=0, eval_every=0))
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a child whose pipe fills up would block before training
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "edgelm", "distill", *args], stdout=subprocess.DEVNULL,
                                stderr=f, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 600  # generous: a loaded CI machine once took minutes to reach the first step
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"event": "train"' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None and '"event": "train"' in metrics.read_text(), log.read_text()[-2000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "continue with --resume" in err.strip().splitlines()[-1]
    assert list((tmp_path / "r" / "checkpoints").glob("step-*"))


def test_cross_entropy_only_needs_no_teacher_forward(tiny_teacher, tiny_corpus, tmp_path):
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "ce", alpha=0.0, max_steps=4))
    recs = [json.loads(ln) for ln in res.metrics_path.read_text().splitlines() if '"train"' in ln]
    assert all(r["kd"] == 0.0 and r["loss"] == pytest.approx(r["ce"]) for r in recs)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_each_loss_trains(tiny_teacher, tiny_corpus, tmp_path, loss):
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / loss, loss=loss, max_steps=6, temperature=2.0,
                          eval_every=0, ckpt_every=0))
    first = json.loads(res.metrics_path.read_text().splitlines()[1])
    assert first["event"] == "eval" and res.val_student.ppl < first["val_ppl"]


def test_token_budget_and_grad_accum(tiny_teacher, tiny_corpus, tmp_path):
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", max_steps=None, max_tokens=2000, grad_accum=2,
                          eval_every=0, ckpt_every=0))
    assert res.steps == 4  # ceil(2000 / (4 * 2 * 64))
    assert res.tokens_seen == 4 * 512


def test_continue_from_a_student_folder_checks_tokenizer(tiny_teacher, tiny_corpus, tmp_path):
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "a", max_steps=2, eval_every=0, ckpt_every=0))
    args = _args(tiny_teacher, tiny_corpus, tmp_path / "b", max_steps=2, eval_every=0, ckpt_every=0,
                 student=str(res.student_dir))
    del args["layers"], args["intermediate_size"]
    res2 = distill(**args)
    assert read_manifest(res2.student_dir)["student"]["init"] == "continued"


def test_torch_compile_trains_and_saves_plain_names(tiny_teacher, tiny_corpus, tmp_path):
    eager = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "eager", max_steps=3, eval_every=0, ckpt_every=0))
    comp = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "compiled", max_steps=3, eval_every=0, ckpt_every=0,
                           compile=True))
    a = load_file(eager.student_dir / "model.safetensors")
    b = load_file(comp.student_dir / "model.safetensors")
    assert a.keys() == b.keys()  # no _orig_mod. prefixes
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


def test_fused_head_loss_trains_like_the_whole_logits(tiny_teacher, tiny_corpus, tmp_path):
    """--kd-chunk (the default) and --kd-chunk 0 compute the same loss, so fp32 runs end with the same weights."""
    kw = dict(max_steps=4, eval_every=0, ckpt_every=0, alpha=0.7)
    fused = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "fused", kd_chunk=48, **kw))
    whole = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "whole", kd_chunk=0, **kw))
    assert fused.manifest["training"]["fused_head_loss"] and not whole.manifest["training"]["fused_head_loss"]
    a, b = load_file(fused.student_dir / "model.safetensors"), load_file(whole.student_dir / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
    assert fused.val_student.ppl == pytest.approx(whole.val_student.ppl, rel=1e-4)


def test_bf16_training_agrees_with_fp32(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    """bf16 autocast (forced here, so the test runs on any CPU) reaches fp32's val perplexity within 1%."""
    import edgelm.distill.precision as precision

    fp32 = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "fp32", eval_every=0, ckpt_every=0))
    monkeypatch.setattr(precision, "native_bf16", lambda device: (True, "forced by the test"))
    bf16 = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "bf16", eval_every=0, ckpt_every=0, bf16="require"))
    assert fp32.manifest["training"]["precision"] == "fp32" and bf16.manifest["training"]["precision"] == "bf16"
    assert bf16.val_teacher.ppl == fp32.val_teacher.ppl  # the teacher is scored in fp32 before it turns bf16
    first = json.loads(fp32.metrics_path.read_text().splitlines()[1])["val_ppl"]  # the pruned student, untrained
    assert bf16.val_student.ppl < 0.95 * first and fp32.val_student.ppl < 0.95 * first
    assert bf16.val_student.ppl == pytest.approx(fp32.val_student.ppl, rel=0.01)
    wa = load_file(bf16.student_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in wa.values()), "master weights stay fp32"


@pytest.mark.parametrize("mode", ["on", "require", "auto"])
def test_bf16_without_native_support(tiny_teacher, tiny_corpus, tmp_path, monkeypatch, caplog, mode):
    """Without native bf16: `on` warns and trains in fp32, `require` refuses before any work, `auto` stays fp32."""
    import edgelm.distill.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: (False, "CPU lacks amx_bf16 and avx512_bf16"))
    args = _args(tiny_teacher, tiny_corpus, tmp_path / "run", max_steps=1, eval_every=0, ckpt_every=0, bf16=mode)
    if mode == "require":
        with pytest.raises(EdgelmError, match="--bf16 require: no native bf16 .*CPU lacks .*use --bf16 auto or off"):
            distill(**args)
        assert not (tmp_path / "run" / "student").exists()
        return
    with caplog.at_level("INFO", logger="edgelm.distill.precision"):
        res = distill(**args)
    assert res.manifest["training"]["precision"] == "fp32"
    rec = [r for r in caplog.records if "precision: fp32" in r.getMessage()]
    assert rec and rec[0].levelname == ("WARNING" if mode == "on" else "INFO")


def test_bad_bf16_and_chunk_flags_are_one_line(tiny_teacher, tiny_corpus, tmp_path):
    for flag, val, msg in (("--bf16", "maybe", "--bf16 must be auto or on or require or off, got 'maybe'"),
                           ("--kd-chunk", "-1", "--kd-chunk must be 0 or more, got -1"),
                           ("--chat-teacher-url", "http://127.0.0.1:9/v1", "add --chat-mix"),
                           ("--chat-teacher-url", "127.0.0.1:8000", "must start with http:// or https://")):
        r = run_cli("distill", "--teacher", str(tiny_teacher), "--data", str(tiny_corpus), "--max-steps", "1",
                    "--out", str(tmp_path / "x"), flag, val)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("target", ["gguf", "onnx"])
def test_width_pruned_student_exports_with_parity(tiny_teacher, tiny_corpus, tmp_path, target):
    """Fewer heads than hidden/head_dim implies (head_dim kept): both targets carry it, greedy-identical to PyTorch."""
    from edgelm.artifact.api import export

    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "run", layers=None, intermediate_size=96,
                          hidden_size=32, heads=2, max_steps=2, eval_every=0, ckpt_every=0))
    assert (res.manifest["student"]["hidden_size"], res.manifest["student"]["heads"]) == (32, 2)
    out = tmp_path / target
    m = export(model=str(res.student_dir), target=target, quant="fp32", out=str(out), data=(str(tiny_corpus),),
               eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8).manifest
    assert m["parity"]["passed"] and m["parity"]["greedy_identical"] == 2


class _Counting:
    """A cursor over range(stop) (a failure at ``fail``), whose state is the next number."""

    def __init__(self, stop: int, fail: int = -1) -> None:
        self.n, self.stop, self.fail = 0, stop, fail

    def state(self) -> dict:
        return {"next": self.n}

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.n == self.fail:
            raise EdgelmError("no readable text")
        if self.n == self.stop:
            raise StopIteration
        self.n += 1
        return self.n - 1


def test_prefetched_keeps_order_and_state_and_raises_where_the_source_fails():
    from edgelm.distill.trainer import Prefetched

    it = Prefetched(_Counting(1000), 7)
    assert it.state() == {"next": 0}
    got = []
    for x in it:
        got.append(x)
        assert it.state() == {"next": x + 1}  # the cursor's state after the item taken, not after those read ahead
    assert got == list(range(1000))

    got = []
    with pytest.raises(EdgelmError, match="no readable text"):
        for x in Prefetched(_Counting(10, fail=5), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    it = Prefetched(_Counting(10**9), 4)  # an endless source: closing the consumer stops the thread
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    import threading

    for t in [t for t in threading.enumerate() if t.name == "edgelm-prefetch"]:
        t.join(timeout=5)
        assert not t.is_alive()


def test_mfu_peak_comes_from_the_table_or_the_flag(caplog):
    """An unknown GPU gets a warning and no MFU figure, never a silent 312 TFLOP/s."""
    import logging

    from edgelm.distill.trainer import peak_flops

    assert peak_flops(name="NVIDIA H200") == 989e12 and peak_flops(name="NVIDIA L40S") == 362e12
    assert peak_flops(name="NVIDIA L4") == 121e12
    assert peak_flops(500.0, name="Some Future GPU") == 500e12
    with caplog.at_level(logging.WARNING):
        assert peak_flops(name="Some Future GPU") is None
    assert "--peak-tflops" in caplog.text and "Some Future GPU" in caplog.text


def test_a_big_teacher_is_held_in_bf16_and_the_student_in_fp32(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    """A teacher whose float32 weights pass the streaming threshold (4 GiB; lowered here) loads in bf16: pruning,
    its val score and KD run on it, and the student it is pruned into trains and is saved in fp32."""
    monkeypatch.setenv("EDGELM_STREAM_BYTES", "1")
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "run", hidden_size=32, max_steps=2, eval_every=0,
                          ckpt_every=0))
    assert res.manifest["training"]["teacher_dtype"] == "bfloat16"
    weights = load_file(res.student_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert math.isfinite(res.val_student.ppl) and math.isfinite(res.val_teacher.ppl)
    monkeypatch.delenv("EDGELM_STREAM_BYTES")
    small = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "small", max_steps=1, eval_every=0, ckpt_every=0))
    assert small.manifest["training"]["teacher_dtype"] == "float32"


def test_a_time_budget_sizes_the_steps_from_the_measured_speed(tiny_teacher, tiny_corpus, tmp_path):
    """--max-minutes: after SIZE_STEPS steps the run is sized to the steps that fit the time left at the median speed
    of steps 2..SIZE_STEPS; --max-steps caps it; a resumed run keeps the size its checkpoint holds."""
    import shutil
    import statistics

    from edgelm.distill.trainer import SIZE_STEPS

    kw = dict(max_steps=None, max_minutes=0.05, eval_every=0, ckpt_every=SIZE_STEPS + 1, keep_ckpts=100)
    res = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "r", **kw))
    b = res.manifest["training"]["time_budget"]
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("event") == "train"]
    assert [r["step"] for r in recs if r.get("event") == "budget"] == [SIZE_STEPS] and not b["capped"]
    assert res.steps == b["steps"] == len(train) > SIZE_STEPS + 1
    tokens_per_step = 4 * 64
    assert b["step_s"] == pytest.approx(statistics.median(tokens_per_step / r["tok_s"] for r in train[1:SIZE_STEPS]),
                                        rel=1e-3)
    # the trainer sized with the exact seconds; the manifest keeps them rounded, which can move the floor by one
    assert abs(b["steps"] - SIZE_STEPS - max(0, math.floor((0.05 * 60 - b["elapsed_s"]) / b["step_s"]))) <= 1
    # a resume from a checkpoint after the sizing trains to the same step count without measuring again
    cut = tmp_path / "cut"
    shutil.copytree(res.run_dir, cut)
    shutil.rmtree(cut / "student")
    last = sorted((cut / "checkpoints").iterdir())[-1]
    assert torch.load(last / "state.pt", weights_only=True)["sized"] == b
    resumed = distill(**_args(tiny_teacher, tiny_corpus, cut, resume=True, **kw))
    assert resumed.steps == res.steps and resumed.manifest["training"]["time_budget"] == b
    budget = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines() if '"budget"' in x]
    assert len(budget) == 1
    capped = distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "c", max_steps=SIZE_STEPS + 2, max_minutes=10,
                             eval_every=0, ckpt_every=0))
    assert capped.steps == SIZE_STEPS + 2 and capped.manifest["training"]["time_budget"]["capped"]
    with pytest.raises(EdgelmError, match="--max-minutes must be at least 0"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "x", max_minutes=-1))
    with pytest.raises(EdgelmError, match="--teacher-cache sizes its file from the step count"):
        distill(**_args(tiny_teacher, tiny_corpus, tmp_path / "y", max_steps=None, max_minutes=1,
                        teacher_cache=str(tmp_path / "tc")))
