"""edgelm: distill a large language model into a small, fast one for edge devices.

The top level is light: heavy modules (torch, transformers) load on first use.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "distill": "edgelm.distill.api",
    "evaluate": "edgelm.distill.api",
    "EvalResult": "edgelm.distill.api",
    "DistillConfig": "edgelm.distill.config",
    "DistillResult": "edgelm.distill.trainer",
    "run_demo": "edgelm.demo",
    "DemoConfig": "edgelm.demo",
    "EdgelmError": "edgelm.errors",
    "qat": "edgelm.qat.api",
    "QatConfig": "edgelm.qat.config",
    "finetune": "edgelm.finetune.api",
    "FinetuneConfig": "edgelm.finetune.config",
    "quantize": "edgelm.quant.api",
    "QuantizeResult": "edgelm.quant.api",
    "export": "edgelm.artifact.api",
    "ExportResult": "edgelm.artifact.api",
    "open_artifact": "edgelm.runtimes.api",
    "QuantizeConfig": "edgelm.quant.config",
    "ExportConfig": "edgelm.artifact.config",
    "load": "edgelm.runtimes.api",
    "GenerationConfig": "edgelm.runtimes.sampling",
    "bench": "edgelm.bench.api",
    "BenchConfig": "edgelm.bench.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgelm' has no attribute {name!r}")
