"""Options of `edgelm quantize` and `edgelm export`; each field becomes a CLI flag, its comment the help text."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class QuantizeConfig:
    model: str = ""  # HF folder, .gguf, built-in name or hub id
    quant: str = "gptq-int4-g32"  # preset name (edgelm list quants)
    out: str = ""  # output folder (a GPTQ-format HF checkpoint)
    force: bool = False  # replace --out if it exists
    data: tuple[str, ...] = ()  # calibration/eval corpus: files, folders, globs, .jsonl (default: stdlib)
    text_field: str = "text"  # text field of .jsonl records
    calib_samples: int = 128  # GPTQ calibration sequences, from the train split
    calib_seqlen: int = 512  # tokens per calibration sequence
    seed: int = 0  # calibration sampling seed
    eval_seqs: int = 32  # val sequences for the measured quality loss (0 = skip)
    eval_seqlen: int = 256  # tokens per val sequence
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal (static groups)
    asym: bool = False  # asymmetric codes (a zero point per group) instead of symmetric
    damp: float | None = None  # GPTQ: Hessian dampening fraction (default: the preset's)
    mse: float | None = None  # GPTQ: Lp norm of a per-group scale search, e.g. 2.4 (default: the preset's)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
