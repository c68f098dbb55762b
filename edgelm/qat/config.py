"""QatConfig: every `edgelm qat` flag. QAT is a mode of the distillation trainer, so it takes the trainer's flags
(budget, batch, bf16, teacher cache, resume, torchrun) and adds what it trains onto."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.distill.config import DistillConfig
from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.qat.api import QatMode
    from edgelm.quant.presets import QuantPreset

# DistillConfig's flags `edgelm qat` leaves out: those that build a new student (QAT trains MODEL, or --start, as it
# is) and the chat mix (it trains on the corpus).
STUDENT_FLAGS = ("student", "zoo", "layers", "intermediate_size", "hidden_size", "heads", "init", "calib_seqs",
                 "chat_mix", "chat_examples", "chat_max_new_tokens", "chat_teacher_url", "chat_teacher_model",
                 "chat_teacher_concurrency")


@dataclass
class QatConfig(DistillConfig):
    model: str = ""  # the float model to train onto the grid: HF folder, built-in name or hub id
    quant: str = "gptq-int4-g32-all"  # preset whose 32-wide block grids it trains onto (edgelm list quants)
    # (GPTQ's codes and scales; a mixed plan's types)
    start: str = ""  # an `edgelm quantize` folder of MODEL with that preset to start from (default: a range search)
    # (on SmolLM2-135M from GPTQ, 20 steps took val ppl 15.41 -> 14.78 with weights, 15.40 -> 15.47 learned;
    # docs/results.md, section qat_goals)
    scales: str = "weights"  # weights (recomputed from them each step, ggml's rule) or learned (LSQ, in log space)
    teacher: str = ""  # KD teacher (default: MODEL itself, self-distillation against its float probabilities)
    lr: float = 2e-4  # peak AdamW learning rate (20 steps on SmolLM2-135M: 44% of the ΔPPL back at 2e-4, 20% at 5e-5)
    warmup_steps: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay (0: the grid is the regularizer)
    eval_seqs: int = 32  # val sequences scored, and compared with MODEL for the quality loss
    out: str = "runs/qat"  # run folder: checkpoints/, metrics.jsonl, quantized/

    def __post_init__(self) -> None:
        super().__post_init__()
        self.model, self.start, self.teacher = (os.fspath(x) for x in (self.model, self.start, self.teacher))
        self.teacher = self.teacher or self.model
        self.student = self.start or self.model  # the float weights the grid starts from

    def validate(self) -> None:
        if not self.model:
            raise EdgelmError("qat needs a model: edgelm qat MODEL --quant PRESET --max-tokens N")
        if self.scales not in ("learned", "weights"):
            raise EdgelmError(f"--scales must be weights or learned, got {self.scales!r}")
        if self.fsdp:
            raise EdgelmError("QAT runs under DDP, not FSDP: the fake quantizers need whole matrices; drop --fsdp")
        if self.compile:
            raise EdgelmError("--compile does not apply to QAT's parametrized weights; drop it")
        if self.chat_mix:
            raise EdgelmError("QAT trains on the corpus (and the teacher's probabilities) only; drop --chat-mix")
        super().validate()
        self.preset()  # an unknown or unfit preset, before any model loads

    def preset(self) -> "QuantPreset":
        """The preset, refused in one line when its grid is not a 32-wide block type that every target packs."""
        from edgelm.quant.grids import BLOCK, BY_CODES
        from edgelm.quant.presets import get_preset

        p = get_preset(self.quant)
        fit = _trainable()
        if not p.weight_only:
            raise EdgelmError(f"QAT trains onto edgelm's 32-wide block grids, which {p.name} ({p.method}) does not "
                              f"use; presets QAT takes: {', '.join(fit)}")
        if p.method != "mixed" and (p.group_size != BLOCK or (p.bits, p.sym) not in BY_CODES):
            raise EdgelmError(f"{p.name} has groups of {p.group_size} columns, which no ggml block type holds "
                              f"exactly; presets QAT takes: {', '.join(fit)}")
        if p.method == "mixed" and len(p.types) > 1 and not self.start:
            raise EdgelmError(f"{p.name} picks a type per tensor from measured sensitivity: quantize first "
                              f"(edgelm quantize {self.model} --quant {p.name} --out Q) and pass --start Q")
        return p

    def train_mode(self) -> "QatMode":
        from edgelm.qat.api import QatMode

        return QatMode(self)


def _trainable() -> list[str]:
    """Presets QAT can train onto: weight-only ones on 32-wide block types."""
    from edgelm.quant.grids import BY_CODES
    from edgelm.registry import QUANTS

    return [n for n, p in QUANTS.items() if p.weight_only and (p.method == "mixed" or (
        p.group_size == 32 and (p.bits, p.sym) in BY_CODES))]
