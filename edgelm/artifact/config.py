"""Options of `edgelm export`; each field becomes a CLI flag, its comment the help text. Export quantizes first when
the preset says so, so it takes every `edgelm quantize` option too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.quant.config import QuantizeConfig

if TYPE_CHECKING:
    from edgelm.quant.presets import QuantPreset


@dataclass(frozen=True)
class ExportConfig(QuantizeConfig):
    quant: str = "fp32"  # preset name (edgelm list quants); rtn/gptq presets quantize first
    target: str = "gguf"  # export target (edgelm list targets)
    out: str = ""  # output artifact folder
    check: bool = True  # check against PyTorch into the manifest (--no-check skips it, with a warning)
    eval_seqs: int = 16  # val sequences for the parity/quality check
    eval_seqlen: int = 128  # tokens per val sequence in the check
    prompts: int = 4  # prompts for the greedy-token parity of fp32 artifacts
    new_tokens: int = 16  # greedy tokens per prompt in that check
    threads: int = 1  # CPU threads of the artifact's runtime during the check
    imatrix: bool = False  # llamacpp-* presets: an importance matrix from the calibration set, for llama-quantize
    arch: str = ""  # tvm: CPU to compile for, x86-64 or aarch64 (default: this machine's; --device aarch64 too)
    tune: int = 0  # tvm: meta-schedule trials (0: a stored database for these shapes if any, else dlight's rules)
    tuning_db: str = ""  # tvm: a tuning database folder to apply (an artifact's tuning/), ignored if for other shapes
    base: str = ""  # MODEL is a LoRA adapter (edgelm finetune): the base artifact its runtime applies it over
    merge: bool = False  # MODEL is a LoRA adapter: bake it into its base and export a new full artifact
    # (zero by default; .onnx_adapter files of that shape, or a lower rank, fill them at run time)
    lora_like: str = ""  # onnx: give the base LoRA inputs shaped like this adapter folder's (its modules and rank)
    max_kld: float | None = None  # the quality gate's KL divergence bound, nats (default: the preset's; random weights)

    def __post_init__(self) -> None:
        super().__post_init__()
        from edgelm.converters.tvm import ARCH_ALIASES, ARCHES

        if self.device.lower() in set(ARCHES) | set(ARCH_ALIASES):  # `--device aarch64`: the CPU to compile for
            object.__setattr__(self, "arch", self.arch or self.device)
            object.__setattr__(self, "device", "")

    def preset(self) -> "QuantPreset":
        import dataclasses

        from edgelm.errors import EdgelmError

        p = super().preset()
        if self.max_kld is not None:
            if not self.max_kld > 0:
                raise EdgelmError(f"--max-kld must be > 0 nats, got {self.max_kld}")
            p = dataclasses.replace(p, max_kld=self.max_kld)  # the check's gate only: the artifact is the same
        return p.with_options(imatrix=True) if self.imatrix else p
