"""FinetuneConfig: every `edgelm finetune` flag. Fine-tuning is a mode of the distillation trainer, so it takes the
trainer's flags (budget, batch, bf16, resume, torchrun) and adds what it trains: a PEFT LoRA adapter, or the whole
model with --full."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.distill.config import DistillConfig
from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.finetune.api import FinetuneMode

# DistillConfig's flags `edgelm finetune` leaves out: those that build a new student (it trains MODEL as it is), the
# chat mix and the teacher cache (it trains on the user's corpus, usually with no teacher).
STUDENT_FLAGS = ("student", "zoo", "layers", "intermediate_size", "hidden_size", "heads", "init", "calib_seqs",
                 "chat_mix", "chat_examples", "chat_max_new_tokens", "chat_teacher_url", "chat_teacher_model",
                 "chat_teacher_concurrency", "teacher_cache", "cache_topk", "teacher_dtype")
# q/k/v/o and the MLP: the projections of every Llama-family block (PEFT matches them by the module's last name)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig(DistillConfig):
    model: str = ""  # the model to adapt: HF folder, built-in name, hub id, or an `edgelm quantize`/`qat` folder
    # (a quantized base trains frozen on its exact grid: an accuracy-recovery adapter for that artifact)
    lora: bool = False  # train a LoRA adapter (the default; the flag says so explicitly)
    full: bool = False  # train every weight instead of a LoRA adapter (for comparison); writes a full model
    rank: int = 16  # LoRA rank r
    lora_alpha: float = 32.0  # LoRA alpha: the update is scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter's input while training
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names LoRA adapts (the last part of the name, as PEFT matches)
    teacher: str = ""  # optional KD teacher on the new domain (with --alpha > 0); default: none, plain cross-entropy
    alpha: float = 0.0  # weight of KD from --teacher; (1 - alpha) goes to cross-entropy on the data
    lr: float = 1e-3  # peak AdamW learning rate (LoRA; a --full run wants ~5e-5)
    warmup_steps: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    out: str = "runs/finetune"  # run folder: checkpoints/, metrics.jsonl, adapter/ (or model/ with --full)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.model, self.teacher = os.fspath(self.model), os.fspath(self.teacher)
        self.targets = tuple(self.targets)
        # Without a KD teacher, the "teacher" the trainer loads is MODEL itself: its val score is the score before.
        self.kd_teacher = self.teacher
        self.teacher = self.teacher or self.model
        self.student = self.model
        self.teacher_cache = ""
        self.teacher_dtype = "float32"

    def validate(self) -> None:
        if not self.model:
            raise EdgelmError("finetune needs a model: edgelm finetune MODEL --data CORPUS --max-tokens N")
        if self.alpha > 0 and not self.kd_teacher:
            raise EdgelmError(f"--alpha {self.alpha} weighs KD from a teacher: add --teacher MODEL, or drop --alpha")
        if self.lora and self.full:
            raise EdgelmError("--lora and --full pick different runs: pass one of them")
        if not self.full:
            if self.rank < 1:
                raise EdgelmError(f"--rank must be at least 1, got {self.rank}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise EdgelmError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            if self.lora_alpha <= 0:
                raise EdgelmError(f"--lora-alpha must be positive, got {self.lora_alpha}")
            if not self.targets:
                raise EdgelmError("--targets needs at least one module name, e.g. q_proj v_proj")
        if self.fsdp and not self.full:
            raise EdgelmError("LoRA runs under DDP, not FSDP: the adapter is small and the base frozen; drop --fsdp")
        if self.chat_mix:
            raise EdgelmError("finetune trains on --data only; drop --chat-mix")
        super().validate()

    def as_dict(self):
        d = super().as_dict()
        d["kd_teacher"] = self.kd_teacher
        return d

    def train_mode(self) -> "FinetuneMode":
        from edgelm.finetune.api import FinetuneMode

        return FinetuneMode(self)
