"""The distillation trainer: logit KD from a teacher into a student, on CPU, one GPU, or many under torchrun.

Run folder layout (``cfg.out``):
    checkpoints/step-0000050/state.pt   resumable state (atomic, the last ``keep_ckpts`` kept)
    metrics.jsonl                       one JSON object per log or eval event
    student/                            the final HF folder + edgelm.json manifest
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgelm.data.corpus import Corpus, CorpusSpec, TokenStream, eval_sequences, split_stats
from edgelm.distill.config import DistillConfig
from edgelm.errors import EdgelmError, Interrupted, TrainingDiverged
from edgelm.fsutil import atomic_dir, atomic_write_text
from edgelm.manifest import read_manifest, write_manifest
from edgelm.metrics import LMScore, mfu, score_lm, tokens_per_second, train_flops_per_token
from edgelm.models.loader import check_same_tokenizer, load_model
from edgelm.models.prune import StudentSpec, build_student, count_params
from edgelm.registry import KD_LOSSES

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 256  # packed sequences mixed across documents


@dataclass
class DistillResult:
    student_dir: Path  # final HF folder with edgelm.json
    run_dir: Path  # checkpoints and metrics
    steps: int  # optimizer steps taken in total
    tokens_seen: int  # student training tokens, all processes
    val_student: LMScore  # final val score
    val_teacher: LMScore  # teacher on the same val sequences
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


@dataclass
class _Dist:
    rank: int = 0  # global rank
    world: int = 1  # processes
    local_rank: int = 0  # rank on this node (picks the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, device: torch.device) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def all_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0])

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _pick_device(cfg: DistillConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EdgelmError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def lr_at(step: int, cfg: DistillConfig, total: int) -> float:
    """Linear warmup then cosine decay to lr * min_lr_ratio; as a multiplier of lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*[0-9]"))


class _Metrics:
    """metrics.jsonl, appended by the main process."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and truncate_after is not None and path.exists():
            # Drop what a killed run logged after the checkpoint we resume from.
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= truncate_after]
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        elif enabled and truncate_after is None and path.exists():
            path.unlink()

    def write(self, **rec: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


def _finished(run: Path, cfg: DistillConfig) -> DistillResult | None:
    """The result of a run that already finished with this config (its student is newer than its last checkpoint):
    --resume has nothing left to train."""
    m = read_manifest(run / "student")  # checks the student's files against it
    if m is None:
        return None
    t = m.get("training", {})
    if "config" not in t or cfg.diff(t["config"]):
        return None
    ckpts = _checkpoints(run)
    if ckpts and int(ckpts[-1].name.split("-")[-1]) > t["steps"]:
        return None
    log.info("%s finished at step %d with this config: nothing to resume (val ppl %.3f)", run, t["steps"],
             m["val"]["student"]["ppl"])
    return DistillResult(run / "student", run, t["steps"], t["tokens_seen"], LMScore(**m["val"]["student"]),
                         LMScore(**m["val"]["teacher"]), m)


def distill(cfg: DistillConfig) -> DistillResult:
    """Train a student from ``cfg.teacher``; see :class:`DistillConfig` for every knob."""
    cfg.validate()
    device = _pick_device(cfg)
    dist = _Dist.init(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    student_dir = run / "student"

    # --- refuse to clobber, or load the checkpoint to resume ---
    state: dict[str, Any] | None = None
    if cfg.resume and (done := _finished(run, cfg)) is not None:
        return done
    if cfg.resume:
        ckpts = _checkpoints(run)
        if not ckpts:
            raise EdgelmError(f"--resume: no checkpoint in {run / 'checkpoints'}; start without --resume")
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        diff = cfg.diff(state["config"])
        if diff:
            raise EdgelmError(f"--resume with a different config ({'; '.join(diff)}); use the original flags or a new --out")
        log.info("resuming from %s (step %d)", ckpts[-1], state["step"])
    elif (student_dir.exists() or _checkpoints(run)) and not cfg.force:
        raise EdgelmError(f"{run} already holds a run; pass --resume to continue it or --force to start over")
    elif cfg.force and dist.main:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    dist.barrier()

    torch.manual_seed(cfg.seed)
    teacher, tok, tsrc = load_model(cfg.teacher)
    corpus = Corpus(CorpusSpec(cfg.data, text_field=cfg.text_field))
    max_pos = getattr(teacher.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise EdgelmError(f"--seq-len must be at most the teacher's context {max_pos}, got {cfg.seq_len}")

    val = eval_sequences(corpus, tok, "val", cfg.seq_len, cfg.eval_seqs)  # [N, T]
    if len(val) == 0:
        raise EdgelmError(f"the val split has less than one {cfg.seq_len}-token sequence; add data or lower --seq-len")
    counts = state["split_stats"] if state is not None else {}  # per-split docs/bytes/tokens, main process only
    if dist.main and state is None:
        counts = split_stats(corpus, tok)
        skipped = corpus.read_stats["train"]
        log.info("corpus %s: %s", corpus.spec.describe(),
                 ", ".join(f"{s} {c['docs']} docs / {c['tokens']:,} tokens" for s, c in counts.items()))
        if skipped.skipped:
            log.info("skipped %d train files (binary %d, non-UTF-8 %d, empty %d), e.g. %s", skipped.skipped,
                     skipped.skipped_binary, skipped.skipped_encoding, skipped.skipped_empty, ", ".join(skipped.examples))

    # --- student ---
    build_info: dict[str, Any]
    if state is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        scfg = AutoConfig.for_model(**state["student_config"])
        student = AutoModelForCausalLM.from_config(scfg)
        missing, unexpected = student.load_state_dict(state["model"], strict=False)
        if unexpected or set(missing) - ({"lm_head.weight"} if scfg.tie_word_embeddings else set()):
            raise EdgelmError(f"checkpoint {ckpts[-1]} does not fit its student config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); start without --resume")
        build_info = state["build_info"]
    elif cfg.student:
        student, stok, _ = load_model(cfg.student)
        check_same_tokenizer(tok, stok, cfg.student)
        build_info = {"init": "continued", "from": cfg.student}
    else:
        calib_stream = TokenStream(corpus, tok, "train", cfg.seq_len, seed=cfg.seed + 1)
        calib = [torch.as_tensor(b) for b in np.array_split(calib_stream.take(cfg.calib_seqs), max(1, cfg.calib_seqs // 4))]
        spec = StudentSpec(cfg.layers, cfg.intermediate_size, cfg.init, cfg.zoo)
        student, build_info = build_student(teacher, spec, calib)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise EdgelmError(
            f"tokenizer mismatch: student vocab {student.config.vocab_size} vs teacher {teacher.config.vocab_size}"
        )
    student.to(device).train()
    teacher.to(device)
    n_student, n_teacher = count_params(student), count_params(teacher)

    # --- parallel wrapping ---
    model = student
    if dist.world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in student.model.layers:
                fully_shard(layer)
            fully_shard(student)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    seqs_per_step = cfg.batch_size * cfg.grad_accum * dist.world
    tokens_per_step = seqs_per_step * cfg.seq_len
    total_steps = cfg.max_steps or math.ceil(cfg.max_tokens / tokens_per_step)
    decay, no_decay = [], []
    for n, p in student.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg, total_steps))
    step, seqs_done = 0, 0
    teacher_val: LMScore | None = None
    if state is not None:
        if cfg.fsdp and dist.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(student, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, seqs_done = state["step"], state["seqs_done"]
        teacher_val = LMScore(**state["teacher_val"])

    kd_fn = KD_LOSSES.get(cfg.loss)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    metrics = _Metrics(run / "metrics.jsonl", dist.main, step if state is not None else None)
    run.mkdir(parents=True, exist_ok=True)

    def evaluate() -> LMScore:
        score = score_lm(student, val, batch_size=cfg.batch_size, device=device)
        metrics.write(event="eval", step=step, tokens=step * tokens_per_step, val_nll=score.nll, val_ppl=score.ppl,
                      val_top1=score.top1)
        return score

    if teacher_val is None:
        teacher_val = score_lm(teacher, val, batch_size=cfg.batch_size, device=device)
        metrics.write(event="teacher", step=0, val_nll=teacher_val.nll, val_ppl=teacher_val.ppl, val_top1=teacher_val.top1)
        evaluate()

    def save_checkpoint() -> Path | None:
        full = _full_state(student, opt, cfg.fsdp and dist.world > 1)
        if not dist.main:
            return None
        path = run / "checkpoints" / f"step-{step:07d}"
        with atomic_dir(path, overwrite=True) as tmp:
            torch.save({
                "model": full[0], "optimizer": full[1], "scheduler": sched.state_dict(), "step": step,
                "seqs_done": seqs_done, "rng": torch.get_rng_state(), "config": cfg.as_dict(),
                "student_config": student.config.to_dict(), "build_info": build_info,
                "teacher_val": teacher_val.as_dict(), "split_stats": counts,
            }, tmp / "state.pt")
        for old in _checkpoints(run)[: -cfg.keep_ckpts]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    # --- the stream: every process reads the same global order and takes its slice ---
    stream = iter(TokenStream(corpus, tok, "train", cfg.seq_len, seed=cfg.seed, shuffle_buffer=SHUFFLE_BUFFER, loop=True))
    for _ in range(seqs_done):
        next(stream)

    bar = None
    if dist.main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="distill", unit="step", dynamic_ncols=True)
    t_start, tokens_timed = time.perf_counter(), 0
    last = {"loss": float("nan")}
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            loss_sum = kd_sum = ce_sum = 0.0
            for micro in range(cfg.grad_accum):
                glob = np.stack([next(stream) for _ in range(cfg.batch_size * dist.world)])  # [B*W, T]
                ids = torch.as_tensor(glob[dist.rank * cfg.batch_size:(dist.rank + 1) * cfg.batch_size], device=device)
                sync = micro == cfg.grad_accum - 1 or dist.world == 1 or cfg.fsdp
                ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
                with ctx:
                    with autocast:
                        s_logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
                    V = s_logits.shape[-1]
                    s_flat = s_logits.reshape(-1, V).float()  # [N, V]
                    ce = F.cross_entropy(s_flat, ids[:, 1:].reshape(-1))
                    if cfg.alpha > 0:
                        with torch.no_grad(), autocast:
                            t_logits = teacher(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
                        kd = kd_fn(s_flat, t_logits.reshape(-1, V).float(), temperature=cfg.temperature, beta=cfg.beta)
                    else:
                        kd = torch.zeros((), device=device)
                    loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
                kd_sum += float(kd.detach()) / cfg.grad_accum
                ce_sum += float(ce.detach()) / cfg.grad_accum
            loss_all = dist.all_sum(loss_sum) / dist.world
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip or float("inf")))
            if not (math.isfinite(loss_all) and math.isfinite(grad_norm)):
                ck = _checkpoints(run)
                where = f"the last good checkpoint is {ck[-1]}" if ck else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss became {loss_all} (grad norm {grad_norm}) at step {step + 1}; stopped, {where}; "
                    "lower --lr or raise --warmup-steps"
                )
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seqs_done += seqs_per_step
            dt = time.perf_counter() - t0
            tokens_timed += tokens_per_step
            tps = tokens_per_second(tokens_per_step, dt)
            last = {"loss": loss_all, "tok_s": tps}
            rec = dict(event="train", step=step, tokens=step * tokens_per_step, loss=loss_all, kd=kd_sum, ce=ce_sum,
                       lr=sched.get_last_lr()[0], grad_norm=grad_norm, tok_s=tps)
            if device.type == "cuda":
                rec["mfu"] = mfu(tps, train_flops_per_token(n_student, n_teacher if cfg.alpha > 0 else 0), _peak_flops())
            metrics.write(**rec)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_all:.3f}", tok_s=f"{tps:,.0f}")
                bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                evaluate()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total_steps:
                save_checkpoint()
                dist.barrier()
    except KeyboardInterrupt:
        path = save_checkpoint()
        raise Interrupted(f"interrupted at step {step}; checkpoint {path}; continue with --resume") from None
    finally:
        if bar is not None:
            bar.close()

    val_student = evaluate()
    wall = time.perf_counter() - t_start
    manifest: dict[str, Any] = {}
    final_state = _full_state(student, None, cfg.fsdp and dist.world > 1)[0]  # collective under FSDP
    if dist.main:
        with atomic_dir(student_dir, overwrite=True) as tmp:
            student.save_pretrained(tmp, state_dict=final_state)
            tok.save_pretrained(tmp)
            manifest = write_manifest(
                tmp, "student",
                source={"teacher": tsrc.spec, "teacher_kind": tsrc.kind, "teacher_sha256": tsrc.sha256, **tsrc.info},
                data={"corpus": corpus.spec.describe(), "val_frac": corpus.spec.val_frac,
                      "test_frac": corpus.spec.test_frac, "splits": counts},
                student={"params": n_student, "teacher_params": n_teacher, "layers": student.config.num_hidden_layers,
                         "intermediate_size": student.config.intermediate_size, **build_info},
                training={"steps": step, "tokens_seen": step * tokens_per_step, "world_size": dist.world,
                          "device": device.type, "final_loss": last["loss"], "wall_s_this_process": round(wall, 1),
                          "config": cfg.as_dict()},
                val={"student": val_student.as_dict(), "teacher": teacher_val.as_dict(), "seqs": len(val),
                     "seq_len": cfg.seq_len},
            )
        log.info("student written to %s (val ppl %.3f, teacher %.3f)", student_dir, val_student.ppl, teacher_val.ppl)
    dist.barrier()
    return DistillResult(student_dir, run, step, step * tokens_per_step, val_student, teacher_val, manifest)


def _full_state(student, opt, fsdp: bool) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state on the CPU, also under FSDP."""
    if not fsdp:
        return student.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(student, options=opts)
    if getattr(student.config, "tie_word_embeddings", False):
        model_sd.pop("lm_head.weight", None)  # gathered twice; it is the embedding
    return model_sd, (get_optimizer_state_dict(student, opt, options=opts) if opt is not None else None)


def _peak_flops() -> float:
    """Dense bf16 peak of the current GPU, for MFU (H100 SXM 989 TFLOP/s; others approximate)."""
    name = torch.cuda.get_device_name()
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12)):
        if key in name:
            return peak
    return 312e12
