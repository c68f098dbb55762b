"""`edgelm finetune`: the distillation trainer in its fine-tuning mode. With LoRA (the default) PEFT injects rank-r
adapters into the chosen projections and only they train; the base stays frozen, and a quantized base (an `edgelm
quantize` or `qat` folder) is held on its exact grid, so the adapter learns against the weights the artifact will
run. The run writes a PEFT adapter folder whose manifest binds it to the base's sha256. ``--full`` trains every
weight the same way and writes a whole model, for comparison."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.distill.trainer import DistillResult
    from edgelm.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)


def finetune(config: "FinetuneConfig | None" = None, **kwargs: Any) -> "DistillResult":
    """Adapt ``model`` to ``data``; keyword arguments are :class:`edgelm.FinetuneConfig` fields. The result's
    ``student_dir`` is the adapter folder (``--full``: the model folder)."""
    from edgelm.distill.trainer import distill
    from edgelm.finetune.config import FinetuneConfig

    if config is None:
        config = FinetuneConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either a FinetuneConfig or keyword arguments, not both")
    return distill(config)


def linear_names(model) -> list[str]:
    """The last names of the model's decoder linears (what --targets may name), sorted."""
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n})


def inject_lora(model, *, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]):
    """PEFT's LoRA layers in ``model`` (in place; the model stays a transformers model, so the trainer's fused loss
    still reaches its body). Everything but the adapters is frozen. Refuses targets the model lacks and a rank no
    smaller than a target's narrow side, in one line."""
    from peft import LoraConfig, inject_adapter_in_model

    have = linear_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise EdgelmError(f"--targets {' '.join(missing)}: no such linear in the model's blocks; it has "
                          f"{', '.join(have)}")
    narrow = min(min(m.weight.shape) for n, m in model.named_modules()
                 if n.rsplit(".", 1)[-1] in targets and hasattr(m, "weight") and ".layers." in n)
    if rank >= narrow:
        raise EdgelmError(f"--rank {rank} is not below the narrowest adapted matrix side ({narrow}); a LoRA update "
                          f"that wide is a full fine-tune: lower --rank or use --full")
    from edgelm.fsutil import quiet_fds

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     task_type="CAUSAL_LM")
    # PEFT's dispatch imports GPTQModel where it is installed, which prints a banner: kept off the user's terminal
    with quiet_fds("edgelm-peft-"):
        inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return cfg


class FinetuneMode:
    """The trainer's fine-tuning mode: LoRA layers on the model before training (and before a checkpoint loads into
    it), and an adapter folder (or, with --full, a model folder) as the output."""

    name = "finetune"

    def __init__(self, cfg: "FinetuneConfig") -> None:
        self.cfg = cfg
        self.output = "model" if cfg.full else "adapter"
        self.lora_config = None

    def prepare(self, student, *, resume: bool) -> None:
        if self.cfg.full:
            return
        c = self.cfg
        self.lora_config = inject_lora(student, rank=c.rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                                       targets=c.targets)
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in student.parameters())
        log.info("LoRA r=%d alpha=%g on %s: %s trainable parameters (%.2f%% of %s)", c.rank, c.lora_alpha,
                 ",".join(c.targets), f"{n_train:,}", 100 * n_train / n_all, f"{n_all:,}")

    @staticmethod
    def no_decay(name: str) -> bool:
        return False

    def write(self, tmp: Path, student, tok, fields: dict[str, Any]) -> dict[str, Any]:
        """The adapter (PEFT's files) or the whole fine-tuned model in ``tmp``, with a manifest that names the base
        and its sha256, the data, the tokens, and the val score before and after."""
        from edgelm.manifest import write_manifest
        from edgelm.models.loader import resolve

        cfg = self.cfg
        src = resolve(cfg.model)
        base = {"spec": src.spec, "kind": src.kind, "sha256": src.sha256, "path": src.path}
        base_config = {k: v for k, v in student.config.to_dict().items() if k != "quantization_config"}
        n_all = sum(p.numel() for p in student.parameters())
        training = fields["training"]
        val = fields["val"]
        run = {"tokens": training["tokens_seen"], "steps": training["steps"], "kd_teacher": cfg.kd_teacher or None,
               "kd_alpha": cfg.alpha, "val_ppl_before": (val.get("start") or {}).get("ppl"),
               "val_ppl_after": val["student"]["ppl"]}
        rest = {k: v for k, v in fields.items() if k not in ("student", "source")}
        if cfg.full:
            if getattr(student.config, "quantization_config", None) is not None:
                del student.config.quantization_config  # a quantized base trained whole is a float model now
            student.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            return write_manifest(tmp, "student", base=base, finetune={"method": "full", "trainable_params": n_all,
                                                                       **run}, **rest)
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from edgelm.finetune.adapter import PEFT_PREFIX, WEIGHTS

        state = get_peft_model_state_dict(student)  # lora_A / lora_B, without the ".default" adapter name
        n_lora = sum(t.numel() for t in state.values())
        save_file({PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                  str(tmp / WEIGHTS), metadata={"format": "pt"})
        lc = self.lora_config
        lc.base_model_name_or_path = src.spec
        lc.save_pretrained(str(tmp))  # adapter_config.json (CONFIG), as PEFT's save_pretrained writes it
        tok.save_pretrained(tmp)
        lora = {"method": "lora", "rank": cfg.rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "targets": list(cfg.targets), "trainable_params": n_lora, "base_params": n_all - n_lora,
                "trainable_share": round(n_lora / (n_all - n_lora), 6)}
        return write_manifest(tmp, "adapter", base=base, base_config=base_config, finetune={**lora, **run}, **rest)

