"""Options of `edgelm quantize`; each field becomes a CLI flag, its comment the help text."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgelm.quant.presets import QuantPreset


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
    device: str = ""  # GPTQ: cpu or cuda (default: cuda when visible)
    budget_bpw: float | None = None  # mixed presets: bits per planned weight, scales included (default: the preset's)
    max_size: float | None = None  # mixed presets: MiB of tensor data (the file adds its tokenizer), not --budget-bpw
    types: tuple[str, ...] = ()  # mixed presets: block types a tensor may get, e.g. Q4_0 Q5_0 Q8_0 (default: the preset's)

    def __post_init__(self) -> None:
        from edgelm.data.corpus import as_sources

        for k in ("model", "out"):
            object.__setattr__(self, k, os.fspath(getattr(self, k)))
        object.__setattr__(self, "data", as_sources(self.data))

    def preset(self) -> "QuantPreset":
        """The named preset with this config's GPTQ/RTN options applied (the name records them)."""
        from edgelm.quant.presets import get_preset

        return get_preset(self.quant).with_options(act_order=self.act_order or None, sym=False if self.asym else None,
                                                   damp=self.damp, mse=self.mse, types=self.types or None,
                                                   budget_bpw=self.budget_bpw, max_mib=self.max_size)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
