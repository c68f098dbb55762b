"""Build a student: prune the teacher (layers by block importance, MLP width by activation magnitude),
or instantiate a zoo shape. Either way the student keeps the teacher's tokenizer and vocab.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from edgelm.errors import EdgelmError
from edgelm.registry import STUDENT_ZOO

log = logging.getLogger(__name__)

# Per-architecture module names (all supported archs share the Llama block layout).
BLOCK_NAMES = {
    "layers": "model.layers",
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),  # rows are MLP neurons
    "mlp_out": "mlp.down_proj",  # columns are MLP neurons
}
# Per-layer config lists that must shrink along with the layers (transformers 5 configs).
PER_LAYER_CONFIG_KEYS = ("layer_types",)


@dataclass(frozen=True)
class StudentSpec:
    layers: int | None = None  # keep this many decoder blocks (prune init); None = all
    intermediate_size: int | None = None  # MLP width after pruning; None = teacher's
    init: str = "prune"  # "prune": weights from the teacher; "random": same shape, fresh init
    zoo: str | None = None  # a named shape from the zoo (random init) instead of pruning

    def validate(self, teacher_config) -> None:
        n, inter = teacher_config.num_hidden_layers, teacher_config.intermediate_size
        if self.init not in ("prune", "random"):
            raise EdgelmError(f"--init must be 'prune' or 'random', got {self.init!r}")
        if self.zoo is not None:
            STUDENT_ZOO.get(self.zoo)
            return
        if self.layers is not None and not 1 <= self.layers <= n:
            raise EdgelmError(f"--layers must be between 1 and the teacher's {n}, got {self.layers}")
        if self.intermediate_size is not None:
            if not 32 <= self.intermediate_size <= inter or self.intermediate_size % 32:
                raise EdgelmError(
                    f"--intermediate-size must be a multiple of 32 between 32 and the teacher's {inter}, "
                    f"got {self.intermediate_size}"
                )
            if self.intermediate_size % 256:
                log.warning("intermediate size %d is not a multiple of 256: llama.cpp K-quants will fall back on down_proj",
                            self.intermediate_size)


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(BLOCK_NAMES["layers"])


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Block influence per layer: 1 - cos(input, output) of its hidden states, averaged over tokens.

    Low influence means the block barely changes the residual stream, so it is the first to drop.
    """
    layers = _layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    hooks = []

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
            y = output[0] if isinstance(output, tuple) else output  # [B, T, H]
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            sums[i] += (1 - cos).sum().double()

        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        for ids in batches:  # [B, T]
            model(input_ids=ids)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    if count == 0:
        raise EdgelmError("no calibration tokens for layer importance; the train split is empty")
    return (sums / count).tolist()


@torch.no_grad()
def mlp_neuron_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Minitron-style width importance: mean |activation| of each MLP neuron (the input of down_proj)."""
    layers = _layers(model)
    sums = [torch.zeros(layer.get_submodule(BLOCK_NAMES["mlp_out"]).in_features, dtype=torch.float64) for layer in layers]
    count = 0
    hooks = []

    def hook(i):
        def fn(module, args):
            a = args[0]  # [B, T, I]
            sums[i] += a.abs().double().sum(dim=(0, 1))

        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.get_submodule(BLOCK_NAMES["mlp_out"]).register_forward_pre_hook(hook(i)))
    try:
        for ids in batches:
            model(input_ids=ids)
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return [s / max(count, 1) for s in sums]


def _shrunk_config(config, keep_layers: list[int], intermediate: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(keep_layers)
    cfg.intermediate_size = intermediate
    for key in PER_LAYER_CONFIG_KEYS:
        vals = getattr(cfg, key, None)
        if isinstance(vals, list) and len(vals) == config.num_hidden_layers:
            setattr(cfg, key, [vals[i] for i in keep_layers])
    return cfg


@torch.no_grad()
def prune(
    teacher: nn.Module,
    keep_layers: list[int],
    intermediate_size: int | None = None,
    neuron_scores: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Copy ``teacher`` keeping the given blocks and, per block, the top ``intermediate_size`` MLP neurons."""
    from transformers import AutoModelForCausalLM

    inter = intermediate_size or teacher.config.intermediate_size
    if inter < teacher.config.intermediate_size and neuron_scores is None:
        raise EdgelmError("width pruning needs neuron importance scores; call mlp_neuron_importance first")
    cfg = _shrunk_config(teacher.config, keep_layers, inter)
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    src = teacher.state_dict()
    prefix = BLOCK_NAMES["layers"] + "."
    new_state = {}
    for key, value in src.items():
        if not key.startswith(prefix):
            new_state[key] = value
            continue
        idx, rest = key[len(prefix):].split(".", 1)
        old = int(idx)
        if old not in keep_layers:
            continue
        new = keep_layers.index(old)
        if inter < teacher.config.intermediate_size:
            top = torch.topk(neuron_scores[old], inter).indices.sort().values  # keep original order
            if any(rest.startswith(n + ".") for n in BLOCK_NAMES["mlp_in"]):
                value = value[top]  # [I, H] rows = neurons
            elif rest.startswith(BLOCK_NAMES["mlp_out"] + "."):
                value = value[:, top]  # [H, I] columns = neurons
        new_state[f"{prefix}{new}.{rest}"] = value.clone()
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    # Tied embeddings show up as a missing lm_head; anything else is a bug in the name table.
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise EdgelmError(f"pruning left weights unmatched (missing {missing[:3]}, unexpected {unexpected[:3]})")
    student.eval()
    return student


def choose_layers(scores: list[float], n_keep: int) -> list[int]:
    """Keep the ``n_keep`` most influential blocks, in their original order."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return sorted(order[:n_keep])


def build_student(teacher: nn.Module, spec: StudentSpec, calib: list[torch.Tensor]) -> tuple[nn.Module, dict]:
    """Return (student, info). ``calib`` is a list of [B, T] id batches from the train split."""
    from transformers import AutoModelForCausalLM

    spec.validate(teacher.config)
    info: dict = {"init": spec.init}
    if spec.zoo is not None:
        cfg = copy.deepcopy(teacher.config)
        for k, v in STUDENT_ZOO.get(spec.zoo).overrides().items():
            setattr(cfg, k, v)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:1] * cfg.num_hidden_layers
        info.update(zoo=spec.zoo, init="random")
        return AutoModelForCausalLM.from_config(cfg), info

    n_layers = spec.layers or teacher.config.num_hidden_layers
    scores = layer_importance(teacher, calib)
    keep = choose_layers(scores, n_layers)
    info.update(layer_importance=[round(s, 6) for s in scores], kept_layers=keep)
    neuron_scores = None
    inter = spec.intermediate_size or teacher.config.intermediate_size
    if inter < teacher.config.intermediate_size:
        neuron_scores = mlp_neuron_importance(teacher, calib)
    student = prune(teacher, keep, inter, neuron_scores)
    if spec.init == "random":
        fresh = AutoModelForCausalLM.from_config(student.config)
        fresh.eval()
        student = fresh
    log.info("student: %d of %d layers %s, MLP width %d, init %s", len(keep), teacher.config.num_hidden_layers,
             keep, inter, spec.init)
    return student, info


def count_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
