"""DistillConfig: every `edgelm distill` flag is a field here (the CLI is generated from it)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from edgelm.errors import EdgelmError

BF16_MODES = ("auto", "on", "require", "off")  # see DistillConfig.bf16
# Fields that may change between a run and its --resume without changing the weights it produces.
RESUME_FREE = {"resume", "force", "progress", "threads", "ckpt_every", "keep_ckpts", "out", "eval_test", "peak_tflops",
               "chat_teacher_concurrency"}


@dataclass
class DistillConfig:
    # --- models ---
    teacher: str = "smollm2-135m-instruct"  # HF folder, .gguf file, built-in name or hub id
    # the teacher's weights: auto (bfloat16 when its float32 weights pass 4 GiB: a 1B-8B teacher; else float32),
    # float32, bfloat16
    teacher_dtype: str = "auto"
    student: str | None = None  # existing HF folder to keep distilling (must share the teacher's tokenizer)
    zoo: str | None = None  # named student shape (random init) instead of pruning; see `edgelm list students`
    layers: int | None = None  # pruned student: decoder blocks to keep (by block importance)
    intermediate_size: int | None = None  # pruned student: MLP width (multiple of 32; 256 suits K-quants)
    hidden_size: int | None = None  # pruned student: model width, by channel importance (multiple of 32; 256 best)
    heads: int | None = None  # pruned student: query heads per block, a multiple of the KV heads (head size kept)
    init: str = "prune"  # "prune" keeps the teacher's weights; "random" uses the pruned shape with fresh weights
    calib_seqs: int = 8  # train-split sequences used to score layers and neurons
    # --- data ---
    data: tuple[str, ...] = ()  # files, folders, globs, .jsonl; empty = the stdlib's source
    text_field: str = "text"  # field of .jsonl records that holds the text
    seq_len: int = 256  # tokens per packed sequence
    chat_mix: float = 0.0  # share of training sequences from the teacher's chat answers (needs a chat template)
    chat_examples: int = 256  # train-split instructions the teacher answers for --chat-mix (answers are cached)
    chat_max_new_tokens: int = 192  # longest teacher answer, in tokens
    # the --chat-mix answers from a teacher on a serving engine (vLLM, llama.cpp's server, TGI: an OpenAI-compatible
    # base URL such as http://127.0.0.1:8000/v1; API key from $EDGELM_CLOUD_API_KEY); logit KD still uses --teacher
    chat_teacher_url: str = ""
    chat_teacher_model: str = ""  # model name sent to --chat-teacher-url (empty: the server's default)
    chat_teacher_concurrency: int = 4  # --chat-teacher-url requests in flight at once
    # --- loss ---
    loss: str = "forward_kl"  # KD loss name; see `edgelm list losses`
    alpha: float = 1.0  # weight of KD; (1 - alpha) goes to cross-entropy on the data
    temperature: float = 1.0  # softens both distributions before the KD loss
    beta: float = 0.5  # JSD interpolation (loss "jsd" only)
    kd_chunk: int = 256  # positions per chunk of the fused lm_head + loss (no whole [B, T, V] logits); 0 = unfused
    teacher_cache: str = ""  # folder of the teacher's top-k log-probs per training sequence, reused by later runs
    # (top 64 ended 2.9% above the full loss's val ppl after 12k tokens, top 256 1.4-1.6%: benchmarks/distill_speed.py)
    cache_topk: int = 256  # teacher words kept per position with --teacher-cache (KD over them plus one bucket)
    # --- optimization ---
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; or set max_tokens
    max_tokens: int | None = None  # token budget, turned into steps
    max_minutes: float = 0.0  # wall-time budget of the training steps, sized from tok/s measured after a few steps
    lr: float = 5e-4  # peak AdamW learning rate
    peak_tflops: float | None = None  # the GPU's dense bf16 peak for MFU (default: edgelm's table by GPU name)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    seed: int = 0  # init, data order and everything random
    compile: bool = False  # torch.compile the student
    fsdp: bool = False  # under torchrun: FSDP instead of DDP
    device: str = "auto"  # "auto" (CUDA if present), "cpu", "cuda"
    bf16: str = "auto"  # bf16 autocast + bf16 teacher: auto (where native), on (else warn, fp32), require, off
    threads: int | None = None  # CPU threads for torch (default: torch's)
    # --- evaluation, checkpoints, output ---
    eval_every: int = 50  # steps between val evaluations (0 = only at start and end)
    eval_seqs: int = 32  # val sequences scored (spread over documents)
    eval_test: bool = False  # also score as many test-split sequences at each evaluation (scaling curves)
    ckpt_every: int = 50  # steps between checkpoints (0 = only on Ctrl-C)
    keep_ckpts: int = 2  # checkpoints kept on disk
    out: str = "runs/distill"  # run folder: checkpoints/, metrics.jsonl, student/
    resume: bool = False  # continue from the latest checkpoint in `out`
    force: bool = False  # overwrite an existing run in `out`
    progress: bool = True  # progress bar on stderr

    def __post_init__(self) -> None:
        from edgelm.data.corpus import as_sources

        self.data = as_sources(self.data)

    def validate(self) -> None:
        def need(ok: bool, flag: str, what: str, got: Any) -> None:
            if not ok:
                raise EdgelmError(f"--{flag.replace('_', '-')} must be {what}, got {got!r}")

        need(0.0 <= self.alpha <= 1.0, "alpha", "between 0 and 1", self.alpha)
        need(self.temperature > 0, "temperature", "positive", self.temperature)
        need(0.0 < self.beta < 1.0, "beta", "strictly between 0 and 1", self.beta)
        need(self.seq_len >= 8, "seq_len", "at least 8", self.seq_len)
        need(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        need(self.grad_accum >= 1, "grad_accum", "at least 1", self.grad_accum)
        need(self.lr > 0, "lr", "positive", self.lr)
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "between 0 and 1", self.min_lr_ratio)
        need(self.warmup_steps >= 0, "warmup_steps", "0 or more", self.warmup_steps)
        need(self.weight_decay >= 0, "weight_decay", "0 or more", self.weight_decay)
        need(self.grad_clip >= 0, "grad_clip", "0 or more", self.grad_clip)
        need(self.eval_every >= 0, "eval_every", "0 or more", self.eval_every)
        need(self.eval_seqs >= 1, "eval_seqs", "at least 1", self.eval_seqs)
        need(self.ckpt_every >= 0, "ckpt_every", "0 or more", self.ckpt_every)
        need(self.keep_ckpts >= 1, "keep_ckpts", "at least 1", self.keep_ckpts)
        need(self.calib_seqs >= 1, "calib_seqs", "at least 1", self.calib_seqs)
        need(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", self.device)
        need(0.0 <= self.chat_mix < 1.0, "chat_mix", "in [0, 1)", self.chat_mix)
        need(self.chat_examples >= 1, "chat_examples", "at least 1", self.chat_examples)
        need(self.chat_max_new_tokens >= 8, "chat_max_new_tokens", "at least 8", self.chat_max_new_tokens)
        need(self.chat_teacher_concurrency >= 1, "chat_teacher_concurrency", "at least 1",
             self.chat_teacher_concurrency)
        if self.chat_teacher_url:
            if not self.chat_teacher_url.startswith(("http://", "https://")):
                raise EdgelmError(f"--chat-teacher-url must start with http:// or https:// (e.g. "
                                  f"http://127.0.0.1:8000/v1), got {self.chat_teacher_url!r}")
            if self.chat_mix <= 0:
                raise EdgelmError("--chat-teacher-url answers the --chat-mix instructions: add --chat-mix (e.g. 0.25)")
        need(self.kd_chunk >= 0, "kd_chunk", "0 or more", self.kd_chunk)
        need(self.cache_topk >= 1, "cache_topk", "at least 1", self.cache_topk)
        if self.teacher_cache:
            if self.loss != "forward_kl":
                raise EdgelmError(f"--teacher-cache keeps the teacher's top-k words, which forward_kl can use; "
                                  f"{self.loss} needs its whole distribution: use --loss forward_kl or drop "
                                  "--teacher-cache")
            if self.kd_chunk == 0:
                raise EdgelmError("--teacher-cache needs the fused loss: drop --kd-chunk 0")
            if self.max_steps is None and self.max_tokens is None:
                raise EdgelmError("--teacher-cache sizes its file from the step count: with --max-minutes, also give "
                                  "--max-tokens or --max-steps (the most the time budget may train)")
        need(self.teacher_dtype in ("auto", "float32", "bfloat16"), "teacher_dtype", "auto, float32 or bfloat16",
             self.teacher_dtype)
        need(self.bf16 in BF16_MODES, "bf16", " or ".join(BF16_MODES), self.bf16)
        need(self.threads is None or self.threads >= 1, "threads", "at least 1", self.threads)
        if self.max_steps is None and self.max_tokens is None and not self.max_minutes:
            raise EdgelmError("set a budget: --max-steps N, --max-tokens N or --max-minutes M")
        need(self.max_minutes >= 0, "max_minutes", "at least 0 (0: no time budget)", self.max_minutes)
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "at least 1", self.max_steps)
        need(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "at least 1", self.max_tokens)
        if self.student and (self.zoo or self.layers or self.intermediate_size or self.hidden_size or self.heads):
            raise EdgelmError("--student continues an existing model; drop --zoo/--layers/--intermediate-size/"
                              "--hidden-size/--heads")
        from edgelm.registry import KD_LOSSES

        KD_LOSSES.get(self.loss)  # unknown name -> error listing the known ones

    def train_mode(self) -> Any:
        """What changes the trainer's student and output (edgelm.qat's QatMode); None: plain distillation."""
        return None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    def diff(self, other: dict[str, Any]) -> list[str]:
        """Fields that differ from a saved config (ignoring RESUME_FREE), as 'name: saved -> now'."""
        mine, other = json.loads(json.dumps(self.as_dict())), json.loads(json.dumps(other))  # tuples as lists
        return [
            f"{k}: {other.get(k)!r} -> {mine[k]!r}"
            for k in sorted(set(mine) | set(other))
            if k not in RESUME_FREE and mine.get(k) != other.get(k)
        ]

