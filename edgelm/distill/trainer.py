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
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelm.data.corpus import Corpus, CorpusSpec, TokenStream, eval_sequences, split_stats
from edgelm.distill.config import DistillConfig
from edgelm.distill.losses import chunked_head_loss, kd_objective, topk_forward_kl
from edgelm.distill.precision import resolve_bf16
from edgelm.errors import EdgelmError, Interrupted, TrainingDiverged
from edgelm.fsutil import atomic_dir, atomic_write_text
from edgelm.manifest import read_manifest, write_manifest
from edgelm.metrics import LMScore, mfu, score_lm, tokens_per_second, train_flops_per_token
from edgelm.models.loader import check_same_tokenizer, load_model, model_from_state
from edgelm.models.prune import StudentSpec, build_student, count_params
from edgelm.registry import KD_LOSSES

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 256  # packed sequences mixed across documents
SIZE_STEPS = 6  # --max-minutes: steps timed before the budget is sized (the first pays for warm-up)


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


def checkpoints(run: Path) -> list[Path]:
    """A run folder's checkpoints, oldest first."""
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


def _finished(run: Path, cfg: DistillConfig, output: str) -> DistillResult | None:
    """The result of a run that already finished with this config (its output is newer than its last checkpoint):
    --resume has nothing left to train."""
    m = read_manifest(run / output)  # checks the output's files against it
    if m is None:
        return None
    t = m.get("training", {})
    if "config" not in t or cfg.diff(t["config"]):
        return None
    ckpts = checkpoints(run)
    if ckpts and int(ckpts[-1].name.split("-")[-1]) > t["steps"]:
        return None
    log.info("%s finished at step %d with this config: nothing to resume (val ppl %.3f)", run, t["steps"],
             m["val"]["student"]["ppl"])
    return DistillResult(run / output, run, t["steps"], t["tokens_seen"], LMScore(**m["val"]["student"]),
                         LMScore(**m["val"]["teacher"]), m)


def distill(cfg: DistillConfig) -> DistillResult:
    """Train a student from ``cfg.teacher``; see :class:`DistillConfig` for every knob. The steps, in order:
    setup (device, processes, resume or refuse to clobber), data (teacher, corpus, val sequences), student (pruned,
    zoo, continued or resumed; parallel wrapping; optimizer), then the loop of step / evaluate / checkpoint, and the
    final student folder with its manifest."""
    cfg.validate()
    mode = cfg.train_mode()  # None, or a mode that changes the student and the output (edgelm.qat)
    output = mode.output if mode is not None else "student"
    device = _pick_device(cfg)
    dist = _Dist.init(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Path(cfg.out)
    if cfg.resume and (done := _finished(run, cfg, output)) is not None:
        return done
    state = _setup(cfg, run, dist, output)
    torch.manual_seed(cfg.seed)
    data = _Data.load(cfg, dist, state, device)
    return _Trainer(cfg, run, device, dist, data, state, mode).train()


def _setup(cfg: DistillConfig, run: Path, dist: _Dist, output: str) -> dict[str, Any] | None:
    """Setup: the checkpoint state to resume from (None for a fresh run); refuses to clobber a run without --force."""
    state: dict[str, Any] | None = None
    if cfg.resume:
        ckpts = checkpoints(run)
        if not ckpts:
            raise EdgelmError(f"--resume: no checkpoint in {run / 'checkpoints'}; start without --resume")
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=True)  # data, never code
        diff = cfg.diff(state["config"])
        if diff:
            raise EdgelmError(f"--resume with a different config ({'; '.join(diff)}); use the original flags or a new --out")
        state["checkpoint"] = str(ckpts[-1])
        log.info("resuming from %s (step %d)", ckpts[-1], state["step"])
    elif ((run / output).exists() or checkpoints(run)) and not cfg.force:
        raise EdgelmError(f"{run} already holds a run; pass --resume to continue it or --force to start over")
    elif cfg.force and dist.main:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    dist.barrier()
    return state


@dataclass
class _Data:
    teacher: Any  # the teacher model (eval mode)
    tok: Any  # its tokenizer, which the student shares
    source: Any  # where the teacher came from (ModelSource)
    corpus: Corpus  # the text, split by file
    val: np.ndarray  # [N, T] val-split sequences, scored at every evaluation
    test: np.ndarray | None  # [N, T] test-split sequences, also scored with --eval-test
    counts: dict[str, Any]  # per-split docs/bytes/tokens (main process)
    chat: list[Any] = field(default_factory=list)  # the teacher's answers mixed in with --chat-mix (chat.Answer)
    teacher_dtype: str = "float32"  # what the teacher was loaded in (bf16 autocast may cast it after its val score)

    @classmethod
    def load(cls, cfg: DistillConfig, dist: _Dist, state: dict[str, Any] | None, device: torch.device) -> "_Data":
        """Data: the teacher (on ``device``) and its tokenizer, the corpus, its val sequences and, with --chat-mix,
        the teacher's chat answers."""
        dtype = _teacher_dtype(cfg)
        teacher, tok, tsrc = load_model(cfg.teacher, dtype=dtype)
        if dtype != "float32":
            log.info("teacher held in %s: its float32 weights pass 4 GiB (EDGELM_STREAM_BYTES); --teacher-dtype "
                     "float32 keeps them", dtype)
        teacher.to(device)
        corpus = Corpus(CorpusSpec(cfg.data, text_field=cfg.text_field))
        max_pos = getattr(teacher.config, "max_position_embeddings", None)
        if max_pos and cfg.seq_len > max_pos:
            raise EdgelmError(f"--seq-len must be at most the teacher's context {max_pos}, got {cfg.seq_len}")
        val = eval_sequences(corpus, tok, "val", cfg.seq_len, cfg.eval_seqs)  # [N, T]
        if len(val) == 0:
            raise EdgelmError(f"the val split has less than one {cfg.seq_len}-token sequence; add data or lower "
                              "--seq-len")
        test = eval_sequences(corpus, tok, "test", cfg.seq_len, cfg.eval_seqs) if cfg.eval_test else None
        counts = state["split_stats"] if state is not None else {}
        if dist.main and state is None:
            counts = split_stats(corpus, tok)
            skipped = corpus.read_stats["train"]
            log.info("corpus %s: %s", corpus.spec.describe(),
                     ", ".join(f"{s} {c['docs']} docs / {c['tokens']:,} tokens" for s, c in counts.items()))
            if skipped.skipped:
                log.info("skipped %d train files (binary %d, non-UTF-8 %d, empty %d), e.g. %s", skipped.skipped,
                         skipped.skipped_binary, skipped.skipped_encoding, skipped.skipped_empty,
                         ", ".join(skipped.examples))
        chat = []
        if cfg.chat_mix > 0:
            from edgelm.distill.chat import AnswerCache, teacher_chat

            def served() -> AnswerCache | None:
                return AnswerCache.served(cfg.chat_teacher_url, tok, model=cfg.chat_teacher_model,
                                          concurrency=cfg.chat_teacher_concurrency) if cfg.chat_teacher_url else None

            if dist.main:  # the others read the answers from the cache it writes
                chat = teacher_chat(teacher, tok, corpus, cfg.chat_examples, cfg.chat_max_new_tokens,
                                    progress=cfg.progress, served=served())
            dist.barrier()
            if not dist.main:
                chat = teacher_chat(teacher, tok, corpus, cfg.chat_examples, cfg.chat_max_new_tokens, served=served())
        return cls(teacher, tok, tsrc, corpus, val, test, counts, chat, dtype)


def _teacher_dtype(cfg: DistillConfig) -> str:
    """--teacher-dtype, with "auto" resolved: bfloat16 for a folder whose float32 weights pass 4 GiB (a 1B-8B
    teacher is only ever run forward, so the student's weights are the only float32 ones), else float32."""
    if cfg.teacher_dtype != "auto":
        return cfg.teacher_dtype
    from edgelm.models.loader import resolve
    from edgelm.models.streamed import should_stream

    src = resolve(cfg.teacher)
    return "bfloat16" if src.kind == "folder" and should_stream(src.path) else "float32"


class _Trainer:
    """Student, optimizer and the training loop of one run."""

    def __init__(self, cfg: DistillConfig, run: Path, device: torch.device, dist: _Dist, data: _Data,
                 state: dict[str, Any] | None, mode: Any = None) -> None:
        self.cfg, self.run, self.device, self.dist, self.data, self.mode = cfg, run, device, dist, data, mode
        self.output, self.label = (mode.output, mode.name) if mode is not None else ("student", "distill")
        self.student, self.build_info = self._student(state)
        self.student.to(device, torch.float32).train()  # fp32 master weights, whatever the teacher is held in
        data.teacher.to(device)
        self.n_student, self.n_teacher = count_params(self.student), count_params(data.teacher)
        # Fused: the student's body runs alone and the lm_head + loss go in chunks (one process; DDP and FSDP hook
        # the whole model's forward, so they keep the unfused path).
        self.fused = cfg.kd_chunk > 0 and dist.world == 1
        self.model = self._wrap(self.student.base_model if self.fused else self.student)  # what the forward runs
        self.seqs_per_step = cfg.batch_size * cfg.grad_accum * dist.world
        self.tokens_per_step = self.seqs_per_step * cfg.seq_len
        # the step budget: --max-steps, else --max-tokens; --max-minutes sizes it (within those) after SIZE_STEPS
        self.cap_steps = cfg.max_steps or (math.ceil(cfg.max_tokens / self.tokens_per_step) if cfg.max_tokens
                                           else None)
        self.total_steps = self.cap_steps or sys.maxsize
        self.sized: dict[str, Any] | None = None  # how --max-minutes sized it (kept in checkpoints)
        self.opt, self.sched = self._optimizer()
        self.step_no, self.seqs_done = 0, 0
        self.stream_state: dict[str, Any] | None = None  # the training stream's state after the last whole step
        self.tcache = self._teacher_cache()
        self.teacher_val: LMScore | None = None
        self.val_start: LMScore | None = None  # the student's val score before its first step
        if state is not None:
            self._restore(state)
        self.kd_fn = KD_LOSSES.get(cfg.loss)
        cfg_s = self.student.config
        self.precision = resolve_bf16(cfg.bf16, device, (cfg.batch_size * cfg.seq_len, cfg_s.hidden_size,
                                                         cfg_s.intermediate_size))
        self.bf16 = self.precision.bf16
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
        self.metrics = _Metrics(run / "metrics.jsonl", dist.main, self.step_no if state is not None else None)
        run.mkdir(parents=True, exist_ok=True)

    def _teacher_cache(self):
        """The --teacher-cache folder, sized for this run's sequences (None without the flag)."""
        cfg, teacher = self.cfg, self.data.teacher
        if not cfg.teacher_cache:
            return None
        if not self.fused:
            raise EdgelmError("--teacher-cache runs in one process (the fused loss); drop it under torchrun")
        vocab = teacher.config.vocab_size
        if cfg.cache_topk > vocab:
            raise EdgelmError(f"--cache-topk must be at most the vocabulary size {vocab}, got {cfg.cache_topk}")
        from edgelm.distill.tcache import TeacherCache

        tc = TeacherCache(cfg.teacher_cache, teacher=self.data.source.sha256 or self.data.source.spec,
                          topk=cfg.cache_topk, temperature=cfg.temperature, seq_len=cfg.seq_len, vocab=vocab,
                          rows=self.total_steps * self.seqs_per_step)
        log.info("teacher cache %s: top %d words per position, %d rows (%.0f MiB)", tc.folder, cfg.cache_topk,
                 tc.rows, tc.nbytes() / 2**20)
        return tc

    def _cached_teacher(self, ids: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k (ids [N, k], log-probs [N, k]) for the micro-batch ids [B, T] that starts at stream
        row ``first``: read from the cache, or computed and written there."""
        from edgelm.distill.tcache import teacher_topk

        k = self.cfg.cache_topk
        ids_np = ids.cpu().numpy()
        got = self.tcache.lookup(first, ids_np)
        if got is None:
            idx, logp = teacher_topk(self.data.teacher, ids, k, self.cfg.temperature, self.cfg.kd_chunk,
                                     self.autocast)
            logp = logp.half().float()  # what the cache holds: a run that reads it trains exactly as this one
            self.tcache.store(first, ids_np, idx, logp)
            got = (idx, logp)
        return got[0].reshape(-1, k).to(self.device), got[1].reshape(-1, k).to(self.device)

    # --- student ---------------------------------------------------------------------------------------------------
    def _student(self, state: dict[str, Any] | None):
        """The student to train: from the checkpoint, an existing folder, a zoo shape, or pruned from the teacher."""
        cfg, data = self.cfg, self.data
        prepare = None if self.mode is None else self.mode.prepare
        if state is not None:
            student = model_from_state(state["student_config"], state["model"], what=f"checkpoint {state['checkpoint']}",
                                       fix="start without --resume",
                                       prepare=prepare and (lambda m: prepare(m, resume=True)))
            build_info = state["build_info"]
        elif cfg.student:
            student, stok, _ = load_model(cfg.student)
            check_same_tokenizer(data.tok, stok, cfg.student)
            build_info = {"init": "continued", "from": cfg.student}
        else:
            calib_stream = TokenStream(data.corpus, data.tok, "train", cfg.seq_len, seed=cfg.seed + 1)
            calib = [torch.as_tensor(b)
                     for b in np.array_split(calib_stream.take(cfg.calib_seqs), max(1, cfg.calib_seqs // 4))]
            spec = StudentSpec(cfg.layers, cfg.intermediate_size, cfg.init, cfg.zoo, cfg.hidden_size, cfg.heads)
            student, build_info = build_student(data.teacher, spec, calib)
        if student.config.vocab_size != data.teacher.config.vocab_size:
            raise EdgelmError(f"tokenizer mismatch: student vocab {student.config.vocab_size} vs teacher "
                              f"{data.teacher.config.vocab_size}")
        if prepare is not None and state is None:
            prepare(student, resume=False)
        return student, build_info

    def _wrap(self, student):
        """Parallel wrapping under torchrun: DDP (default) or FSDP per decoder block; then torch.compile if asked."""
        model = student
        if self.dist.world > 1:
            if self.cfg.fsdp:
                from torch.distributed.fsdp import fully_shard

                for layer in student.model.layers:
                    fully_shard(layer)
                fully_shard(student)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = DDP(student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(model) if self.cfg.compile else model

    @property
    def fsdp(self) -> bool:
        return self.cfg.fsdp and self.dist.world > 1

    def _optimizer(self):
        """AdamW (no weight decay on norms and biases), linear warmup then cosine decay."""
        def skip(name: str, p: torch.nn.Parameter) -> bool:
            return p.ndim < 2 or (self.mode is not None and self.mode.no_decay(name))

        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]  # LoRA: the adapters only
        decay = [p for n, p in named if not skip(n, p)]
        no_decay = [p for n, p in named if skip(n, p)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=(0.9, 0.95), fused=self.device.type == "cuda",
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, self.cfg, self.total_steps))

    def _restore(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.student, self.opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step_no, self.seqs_done = state["step"], state["seqs_done"]
        if state.get("sized"):  # a resumed run keeps the step count its time budget gave it, measured once
            self.sized, self.total_steps = state["sized"], state["sized"]["steps"]
        self.stream_state = _numpy(state.get("stream"))
        self.teacher_val = LMScore(**state["teacher_val"])
        self.val_start = LMScore(**state["val_start"]) if state.get("val_start") else None

    def _stream(self, state: dict[str, Any] | None):
        """The training sequences, as a cursor with ``state()``: every process reads the same global order and takes
        its slice. A checkpoint's stream state puts it where the run stood; an older checkpoint without one replays
        the sequences it has seen."""
        cfg = self.cfg
        code = TokenStream(self.data.corpus, self.data.tok, "train", cfg.seq_len, seed=cfg.seed,
                           shuffle_buffer=SHUFFLE_BUFFER, loop=True)
        if not self.data.chat:
            stream = code.cursor(state)
        else:
            from edgelm.distill.chat import ChatStream, MixedStream, render

            chat = ChatStream([render(self.data.tok, a.instruction.prompt, a.text, a.finished) for a in self.data.chat],
                              self.data.tok, cfg.seq_len, seed=cfg.seed)
            log.info("chat mix: %.0f%% of sequences from %d teacher answers (%s tokens)", 100 * cfg.chat_mix,
                     len(self.data.chat), f"{chat.tokens:,}")
            stream = MixedStream(code.cursor(state and state["code"]), chat.cursor(state and state["chat"]),
                                 cfg.chat_mix, cfg.seed, state)
        if state is None and self.seqs_done:
            log.info("replaying %d sequences (the checkpoint predates stream positions)", self.seqs_done)
            for _ in range(self.seqs_done):
                next(stream)
        return stream

    # --- evaluate and checkpoint -----------------------------------------------------------------------------------
    def evaluate(self) -> LMScore:
        """The student's val score, logged."""
        score = score_lm(self.student, self.data.val, batch_size=self.cfg.batch_size, device=self.device)
        rec = dict(val_nll=score.nll, val_ppl=score.ppl, val_top1=score.top1)
        if self.data.test is not None and len(self.data.test):
            test = score_lm(self.student, self.data.test, batch_size=self.cfg.batch_size, device=self.device)
            rec.update(test_nll=test.nll, test_ppl=test.ppl, test_top1=test.top1)
        self.metrics.write(event="eval", step=self.step_no, tokens=self.step_no * self.tokens_per_step, **rec)
        return score

    def save_checkpoint(self) -> Path | None:
        """Everything a bit-identical resume needs, written atomically; the last ``keep_ckpts`` are kept."""
        full = _full_state(self.student, self.opt, self.fsdp)
        if not self.dist.main:
            return None
        path = self.run / "checkpoints" / f"step-{self.step_no:07d}"
        with atomic_dir(path, overwrite=True) as tmp:
            torch.save({
                "model": full[0], "optimizer": full[1], "scheduler": self.sched.state_dict(), "step": self.step_no,
                "seqs_done": self.seqs_done, "rng": torch.get_rng_state(), "config": self.cfg.as_dict(),
                "stream": _tensors(self.stream_state),
                "student_config": self.student.config.to_dict(), "build_info": self.build_info,
                "teacher_val": self.teacher_val.as_dict(),
                "val_start": self.val_start.as_dict() if self.val_start else None, "split_stats": self.data.counts,
                "sized": self.sized,
            }, tmp / "state.pt")
        if self.tcache is not None:
            self.tcache.flush()
        for old in checkpoints(self.run)[: -self.cfg.keep_ckpts]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    # --- one optimizer step ----------------------------------------------------------------------------------------
    def step(self, stream) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; every process takes its slice of the global batch."""
        cfg, dist, device = self.cfg, self.dist, self.device
        loss_sum = kd_sum = ce_sum = 0.0
        for micro in range(cfg.grad_accum):
            glob = np.stack([next(stream) for _ in range(cfg.batch_size * dist.world)])  # [B*W, T]
            ids = torch.as_tensor(glob[dist.rank * cfg.batch_size:(dist.rank + 1) * cfg.batch_size], device=device)
            sync = micro == cfg.grad_accum - 1 or dist.world == 1 or cfg.fsdp
            no_sync = self.model.no_sync() if not sync and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with no_sync:
                loss, kd, ce = self._loss(ids, self.seqs_done + micro * cfg.batch_size * dist.world)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            kd_sum += float(kd.detach()) / cfg.grad_accum
            ce_sum += float(ce.detach()) / cfg.grad_accum
        loss_all = dist.all_sum(loss_sum) / dist.world
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip or float("inf")))
        if not (math.isfinite(loss_all) and math.isfinite(grad_norm)):
            ck = checkpoints(self.run)
            where = f"the last good checkpoint is {ck[-1]}" if ck else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {loss_all} (grad norm {grad_norm}) at step {self.step_no + 1}; "
                                   f"stopped, {where}; lower --lr or raise --warmup-steps")
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.seqs_done += self.seqs_per_step
        return {"loss": loss_all, "kd": kd_sum, "ce": ce_sum, "grad_norm": grad_norm}

    def _loss(self, ids: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha * KD + (1 - alpha) * CE, KD, CE) of one micro-batch ids [B, T] (stream rows first..), each a mean
        over positions."""
        cfg, teacher = self.cfg, self.data.teacher
        targets = ids[:, 1:].reshape(-1)  # [N], N = B * (T-1)
        if self.fused:
            with self.autocast:
                h = self.model(input_ids=ids).last_hidden_state[:, :-1]  # [B, T-1, H]
            h_t = w_t = None
            if cfg.alpha > 0 and self.tcache is not None:
                t_top = self._cached_teacher(ids, first)
                with self.autocast:
                    return chunked_head_loss(h.reshape(-1, h.shape[-1]), self.student.get_output_embeddings().weight,
                                             None, None, targets, topk_forward_kl, alpha=cfg.alpha,
                                             temperature=cfg.temperature, chunk=cfg.kd_chunk, t_top=t_top)
            if cfg.alpha > 0:
                with torch.no_grad(), self.autocast:
                    h_t = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1]  # [B, T-1, Ht]
                h_t, w_t = h_t.reshape(-1, h_t.shape[-1]), teacher.get_output_embeddings().weight
            with self.autocast:
                return chunked_head_loss(h.reshape(-1, h.shape[-1]), self.student.get_output_embeddings().weight, h_t,
                                         w_t, targets, self.kd_fn, alpha=cfg.alpha, temperature=cfg.temperature,
                                         beta=cfg.beta, chunk=cfg.kd_chunk)
        with self.autocast:
            s_logits = self.model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
        V = s_logits.shape[-1]
        t_flat = None
        if cfg.alpha > 0:
            with torch.no_grad(), self.autocast:
                t_flat = teacher(input_ids=ids).logits[:, :-1].reshape(-1, V).float()  # [N, V]
        total, kd, ce = kd_objective(s_logits.reshape(-1, V).float(), t_flat, targets, self.kd_fn, cfg.alpha,
                                     cfg.temperature, cfg.beta)
        n = targets.numel()
        return total / n, kd / n, ce / n

    # --- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> DistillResult:
        cfg, dist = self.cfg, self.dist
        if self.teacher_val is None:
            self.teacher_val = score_lm(self.data.teacher, self.data.val, batch_size=cfg.batch_size, device=self.device)
            tv = self.teacher_val
            self.metrics.write(event="teacher", step=0, val_nll=tv.nll, val_ppl=tv.ppl, val_top1=tv.top1)
            self.val_start = self.evaluate()
        if self.bf16:
            self.data.teacher.to(torch.bfloat16)  # after its fp32 val score; only ever run forward
        stream = self._stream(self.stream_state)
        if self.device.type == "cuda":  # pack the next batches while the GPU runs this one
            stream = Prefetched(stream, 2 * cfg.batch_size * cfg.grad_accum * dist.world)
        self.stream_state = stream.state()
        bar = None
        if dist.main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step_no, desc=self.label, unit="step", dynamic_ncols=True)
        t_start = time.perf_counter()
        last = {"loss": float("nan")}
        step_s: list[float] = []
        try:
            while self.step_no < self.total_steps:
                t0 = time.perf_counter()
                last = self.step(stream)
                self.stream_state = stream.state()  # after a whole step: what a checkpoint resumes from
                step_s.append(time.perf_counter() - t0)
                tps = tokens_per_second(self.tokens_per_step, step_s[-1])
                if cfg.max_minutes and self.sized is None and len(step_s) == SIZE_STEPS:
                    self._size_budget(step_s, time.perf_counter() - t_start)
                    if bar is not None:
                        bar.total = self.total_steps
                rec = dict(event="train", step=self.step_no, tokens=self.step_no * self.tokens_per_step, **last,
                           lr=self.sched.get_last_lr()[0], tok_s=tps)
                if self.device.type == "cuda":
                    flops = train_flops_per_token(self.n_student, self.n_teacher if cfg.alpha > 0 else 0)
                    peak = peak_flops(cfg.peak_tflops)
                    if peak is not None:
                        rec["mfu"] = mfu(tps, flops, peak)
                self.metrics.write(**rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    bar.update(1)
                mid_run = self.step_no < self.total_steps
                if cfg.eval_every and self.step_no % cfg.eval_every == 0 and mid_run:
                    self.evaluate()
                if cfg.ckpt_every and self.step_no % cfg.ckpt_every == 0 and mid_run:
                    self.save_checkpoint()
                    dist.barrier()
        except KeyboardInterrupt:
            path = self.save_checkpoint()
            raise Interrupted(f"interrupted at step {self.step_no}; checkpoint {path}; "
                              "continue with --resume") from None
        finally:
            if bar is not None:
                bar.close()
            if isinstance(stream, Prefetched):
                stream.close()
        return self.finish(last["loss"], time.perf_counter() - t_start)

    def _size_budget(self, step_s: list[float], elapsed: float) -> None:
        """--max-minutes: the steps that fit the time left at the median speed of the steps after the first (which
        pays for warm-up), within --max-steps/--max-tokens when set. Evaluations are not counted."""
        import statistics

        per_step = statistics.median(step_s[1:])
        left = self.cfg.max_minutes * 60 - elapsed
        steps = self.step_no + max(0, math.floor(left / per_step))
        self.total_steps = min(steps, self.cap_steps or steps)
        self.sized = {"minutes": self.cfg.max_minutes, "tok_s": round(self.tokens_per_step / per_step, 1),
                      "measured_steps": len(step_s) - 1, "elapsed_s": round(elapsed, 3),
                      "step_s": round(per_step, 6), "steps": self.total_steps,
                      "capped": self.cap_steps is not None and steps > self.cap_steps}
        self.metrics.write(event="budget", step=self.step_no, **self.sized)
        log.info("time budget %.1f min: %.0f tok/s measured over %d steps -> %d steps (%s tokens)%s",
                 self.cfg.max_minutes, self.sized["tok_s"], len(step_s) - 1, self.total_steps,
                 f"{self.total_steps * self.tokens_per_step:,}", ", capped by --max-steps/--max-tokens"
                 if self.sized["capped"] else "")

    def finish(self, final_loss: float, wall: float) -> DistillResult:
        """The final evaluation and the student folder with its manifest."""
        cfg, dist, data, student = self.cfg, self.dist, self.data, self.student
        val_student = self.evaluate()
        student_dir = self.run / self.output
        cache: dict[str, Any] = {}
        if self.tcache is not None:
            tc = self.tcache
            tc.close()
            cache = {"folder": str(tc.folder), "topk": tc.topk, "hits": tc.hits, "misses": tc.misses}
            log.info("teacher cache: %d sequences read, %d computed and written", tc.hits, tc.misses)
        manifest: dict[str, Any] = {}
        final_state = _full_state(student, None, self.fsdp)[0]  # collective under FSDP
        tokens = self.step_no * self.tokens_per_step
        if dist.main:
            tsrc = data.source
            fields = dict(
                source={"teacher": tsrc.spec, "teacher_kind": tsrc.kind, "teacher_sha256": tsrc.sha256, **tsrc.info},
                data={"corpus": data.corpus.spec.describe(), "val_frac": data.corpus.spec.val_frac,
                      "test_frac": data.corpus.spec.test_frac, "splits": data.counts},
                student={"params": self.n_student, "teacher_params": self.n_teacher,
                         "layers": student.config.num_hidden_layers,
                         "intermediate_size": student.config.intermediate_size,
                         "hidden_size": student.config.hidden_size,
                         "heads": student.config.num_attention_heads, **self.build_info},
                training={"steps": self.step_no, "tokens_seen": tokens, "world_size": dist.world,
                          "time_budget": self.sized,
                          "device": self.device.type, "precision": "bf16" if self.bf16 else "fp32",
                          "precision_reason": self.precision.reason, "teacher_dtype": data.teacher_dtype,
                          "bf16_speedup": self.precision.bf16_speedup,
                          "fused_head_loss": self.fused, "final_loss": final_loss, "teacher_cache": cache,
                          "chat": {"mix": cfg.chat_mix, "answers": len(data.chat),
                                   "finished": sum(a.finished for a in data.chat),
                                   "teacher": cfg.chat_teacher_url or "local"},
                          "wall_s_this_process": round(wall, 1), "config": cfg.as_dict()},
                val={"student": val_student.as_dict(), "teacher": self.teacher_val.as_dict(),
                     "start": self.val_start.as_dict() if self.val_start else None,
                     "seqs": len(data.val), "seq_len": cfg.seq_len},
            )
            with atomic_dir(student_dir, overwrite=True) as tmp:
                if self.mode is not None:  # the mode's own output (QAT: the quantized checkpoint)
                    manifest = self.mode.write(tmp, student, data.tok, fields)
                else:
                    student.save_pretrained(tmp, state_dict=final_state)
                    data.tok.save_pretrained(tmp)
                    manifest = write_manifest(tmp, "student", **fields)
            log.info("%s written to %s (val ppl %.3f, teacher %.3f)", student_dir.name, student_dir, val_student.ppl,
                     self.teacher_val.ppl)
        dist.barrier()
        return DistillResult(student_dir, self.run, self.step_no, tokens, val_student, self.teacher_val, manifest)


class Prefetched:
    """The items of a cursor, in order, read up to ``depth`` ahead by a background thread. The tokenizer releases
    the GIL, so on a GPU the next batches are tokenized and packed while the current step runs. ``state()`` is the
    cursor's state after the last item taken here (the thread reads it with each item). An error in the cursor is
    raised here, at the item where it happened."""

    def __init__(self, it, depth: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self._state = it.state()
        self._done = False
        threading.Thread(target=self._work, args=(it,), name="edgelm-prefetch", daemon=True).start()

    def _put(self, item: tuple[str, Any, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _work(self, it) -> None:
        try:
            for x in it:
                if not self._put(("item", x, it.state())):
                    return
            self._put(("end", None, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put(("error", e, None))

    def state(self) -> dict:
        return self._state

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, x, st = self.q.get()
        if kind == "item":
            self._state = st
            return x
        self._done = True
        self.stop.set()
        if kind == "error":
            raise x
        raise StopIteration

    def close(self) -> None:
        self.stop.set()


def _tensors(x: Any) -> Any:
    """A stream state with its numpy arrays as tensors, which torch.load(weights_only=True) reads back."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tensors(v) for v in x]
    return x


def _numpy(x: Any) -> Any:
    """The inverse of _tensors."""
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _numpy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numpy(v) for v in x]
    return x


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


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}  # dense bf16, by a part of the device's name


def peak_flops(override_tflops: float | None = None, name: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the current GPU for MFU: ``override_tflops`` (--peak-tflops) when given, else
    from PEAK_BF16_TFLOPS by name. An unknown GPU gets a warning and None (no MFU figure), never a guess."""
    if override_tflops:
        return override_tflops * 1e12
    name = name if name is not None else torch.cuda.get_device_name()
    for key, peak in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # "L40S" before "L4"
        if key in name:
            return peak * 1e12
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("MFU: the bf16 peak of %r is not in edgelm's table; pass --peak-tflops to report MFU", name)
    return None


_WARNED: set[str] = set()
