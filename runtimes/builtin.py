"""Registers the built-in backends in RUNTIMES. Their heavy libraries load only when a model opens."""
from __future__ import annotations

from edgelm.registry import RUNTIMES
from edgelm.runtimes.llamacpp import LlamaCppRuntime
from edgelm.runtimes.onnxrt import OnnxRuntime
from edgelm.runtimes.pytorch import TorchRuntime
from edgelm.runtimes.tvmrt import TvmRuntime

for _cls in (TorchRuntime, OnnxRuntime, LlamaCppRuntime, TvmRuntime):
    RUNTIMES.register(_cls)
