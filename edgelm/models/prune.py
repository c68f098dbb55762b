"""Build a student: prune the teacher, or instantiate a zoo shape. Either way the student keeps the teacher's
tokenizer and vocab.

Pruning is depth (whole blocks, by block influence) and width, Minitron style (Muralidharan et al., 2024): MLP
neurons, attention heads and the model's hidden channels, each ranked by its mean activation on calibration text.
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

# Module names every supported arch's block has (edgelm.models.archs: the Llama block, Phi-3's fused projections and
# Gemma's extra norms are handled by name below).
BLOCK_NAMES = {
    "layers": "model.layers",
    "mlp_out": "mlp.down_proj",  # columns are MLP neurons
    "attn_out": "self_attn.o_proj",  # columns are the query heads' outputs, head by head
    # the block's RMSNorms (Gemma has all four); their outputs rank the hidden channels
    "norms": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}
# Which axis of each weight runs over what width pruning removes: "hidden" channels (the residual stream), "mlp"
# neurons or query "heads" (head_dim rows or columns each); Phi-3's fused projections stack them: "qkv" (the kept
# heads' query rows, then every key and value row) and "mlp2" (the kept neurons' gate rows, then their up rows).
# Matched by the longest suffix of the weight's name.
PRUNED_AXES: dict[str, dict[int, str]] = {
    "embed_tokens.weight": {1: "hidden"},
    "lm_head.weight": {1: "hidden"},
    "norm.weight": {0: "hidden"},
    "input_layernorm.weight": {0: "hidden"},
    "post_attention_layernorm.weight": {0: "hidden"},
    "pre_feedforward_layernorm.weight": {0: "hidden"},
    "post_feedforward_layernorm.weight": {0: "hidden"},
    "self_attn.q_proj.weight": {0: "heads", 1: "hidden"},
    "self_attn.q_proj.bias": {0: "heads"},
    "self_attn.k_proj.weight": {1: "hidden"},
    "self_attn.k_proj.bias": {},
    "self_attn.v_proj.weight": {1: "hidden"},
    "self_attn.v_proj.bias": {},
    "self_attn.o_proj.weight": {0: "hidden", 1: "heads"},
    "self_attn.qkv_proj.weight": {0: "qkv", 1: "hidden"},
    "self_attn.q_norm.weight": {},  # over one head's channels (Qwen3, Gemma 3): unchanged by every pruning
    "self_attn.k_norm.weight": {},
    "mlp.gate_proj.weight": {0: "mlp", 1: "hidden"},
    "mlp.up_proj.weight": {0: "mlp", 1: "hidden"},
    "mlp.down_proj.weight": {0: "hidden", 1: "mlp"},
    "mlp.gate_up_proj.weight": {0: "mlp2", 1: "hidden"},
}
# Per-layer config lists that must shrink along with the layers (transformers 5 configs).
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class StudentSpec:
    layers: int | None = None  # keep this many decoder blocks (prune init); None = all
    intermediate_size: int | None = None  # MLP width after pruning; None = teacher's
    init: str = "prune"  # "prune": weights from the teacher; "random": same shape, fresh init
    zoo: str | None = None  # a named shape from the zoo (random init) instead of pruning
    hidden_size: int | None = None  # model width (hidden channels) after pruning; None = teacher's
    heads: int | None = None  # query heads per block after pruning (a multiple of the KV heads); None = teacher's

    def validate(self, teacher_config) -> None:
        n, inter = teacher_config.num_hidden_layers, teacher_config.intermediate_size
        if self.init not in ("prune", "random"):
            raise EdgelmError(f"--init must be 'prune' or 'random', got {self.init!r}")
        if self.zoo is not None:
            STUDENT_ZOO.get(self.zoo)
            return
        if self.layers is not None and not 1 <= self.layers <= n:
            raise EdgelmError(f"--layers must be between 1 and the teacher's {n}, got {self.layers}")
        for flag, value, top in (("intermediate-size", self.intermediate_size, inter),
                                 ("hidden-size", self.hidden_size, teacher_config.hidden_size)):
            if value is None:
                continue
            if not 32 <= value <= top or value % 32:
                raise EdgelmError(f"--{flag} must be a multiple of 32 between 32 and the teacher's {top}, got {value}")
            if value % 256:
                log.warning("--%s %d is not a multiple of 256: llama.cpp K-quants will fall back on the matrices "
                            "whose rows are that long", flag, value)
        nq, nkv = teacher_config.num_attention_heads, teacher_config.num_key_value_heads
        if self.heads is not None and (not nkv <= self.heads <= nq or self.heads % nkv):
            raise EdgelmError(f"--heads must be a multiple of the teacher's {nkv} KV heads, at most its {nq} "
                              f"query heads, got {self.heads}")
        hidden, heads = self.hidden_size or teacher_config.hidden_size, self.heads or nq
        if hidden % heads:  # transformers refuses to save or load such a config
            able = [h for h in range(nkv, nq + 1, nkv) if hidden % h == 0]
            raise EdgelmError(f"a hidden size of {hidden} is not divisible by {heads} query heads, which transformers "
                              f"refuses; pick --heads from {able or 'none: change --hidden-size'}")


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(BLOCK_NAMES["layers"])


def _calibrate(model: nn.Module, batches: Iterable[torch.Tensor], hooks: list) -> int:
    """Run ``model`` on every batch [B, T] with ``hooks`` (removed after, also on error); the tokens seen."""
    count = 0
    device = next(model.parameters()).device  # the batches come from the CPU; the model may be on a GPU
    try:
        for ids in batches:
            model(input_ids=ids.to(device))
            count += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return count


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Block influence per layer: 1 - cos(input, output) of its hidden states, averaged over tokens.

    Low influence means the block barely changes the residual stream, so it is the first to drop.
    """
    layers = _layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
            y = output[0] if isinstance(output, tuple) else output  # [B, T, H]
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            sums[i] += (1 - cos).sum().double().cpu()

        return fn

    count = _calibrate(model, batches, [layer.register_forward_hook(hook(i), with_kwargs=True)
                                        for i, layer in enumerate(layers)])
    if count == 0:
        raise EdgelmError("no calibration tokens for layer importance; the train split is empty")
    return (sums / count).tolist()


@torch.no_grad()
def mlp_neuron_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Minitron-style width importance: mean |activation| of each MLP neuron (the input of down_proj)."""
    layers = _layers(model)
    sums = [torch.zeros(layer.get_submodule(BLOCK_NAMES["mlp_out"]).in_features, dtype=torch.float64) for layer in layers]

    def hook(i):
        def fn(module, args):
            a = args[0]  # [B, T, I]
            sums[i] += a.abs().double().sum(dim=(0, 1)).cpu()

        return fn

    count = _calibrate(model, batches, [layer.get_submodule(BLOCK_NAMES["mlp_out"]).register_forward_pre_hook(hook(i))
                                        for i, layer in enumerate(layers)])
    return [s / max(count, 1) for s in sums]


@torch.no_grad()
def head_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per block, each query head's mean L2 norm of its attention output (the input of o_proj): [heads] per layer."""
    cfg = model.config
    nq = cfg.num_attention_heads
    layers = _layers(model)
    sums = [torch.zeros(nq, dtype=torch.float64) for _ in layers]

    def hook(i):
        def fn(module, args):
            a = args[0]  # [B, T, nq * head_dim]
            sums[i] += a.reshape(*a.shape[:-1], nq, -1).float().norm(dim=-1).double().sum(dim=(0, 1)).cpu()

        return fn

    count = _calibrate(model, batches, [layer.get_submodule(BLOCK_NAMES["attn_out"]).register_forward_pre_hook(hook(i))
                                        for i, layer in enumerate(layers)])
    return [s / max(count, 1) for s in sums]


@torch.no_grad()
def hidden_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Each hidden channel's mean |activation| at the outputs of every block's norms, summed over blocks: [H]."""
    sums = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def fn(module, args, output):
        sums.add_(output.abs().double().sum(dim=(0, 1)).cpu())  # output [B, T, H]

    count = _calibrate(model, batches, [layer.get_submodule(name).register_forward_hook(fn) for layer in _layers(model)
                                        for name in BLOCK_NAMES["norms"] if hasattr(layer, name)])
    return sums / max(count, 1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order."""
    return torch.topk(scores, k).indices.sort().values


def _kept_heads(scores: torch.Tensor, keep: int, n_kv: int) -> torch.Tensor:
    """The ``keep`` query heads to keep: the same number from each KV group (GQA), the strongest of each."""
    per_group = len(scores) // n_kv
    return torch.cat([g * per_group + _top(scores[g * per_group:(g + 1) * per_group], keep // n_kv)
                      for g in range(n_kv)])


def _axes_of(key: str) -> dict[int, str] | None:
    """The pruned axes of weight ``key`` (None when the name table does not know it)."""
    matches = [suffix for suffix in PRUNED_AXES if key == suffix or key.endswith("." + suffix)]
    return PRUNED_AXES[max(matches, key=len)] if matches else None


def _shrunk_config(config, keep_layers: list[int], intermediate: int, hidden: int, heads: int):
    cfg = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cfg.num_hidden_layers = len(keep_layers)
    cfg.intermediate_size = intermediate
    cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim = hidden, heads, head_dim  # head_dim stays the teacher's
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
    *,
    hidden_size: int | None = None,
    hidden_scores: torch.Tensor | None = None,
    heads: int | None = None,
    head_scores: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Copy ``teacher`` keeping the given blocks and, where a width is given, the top-scoring MLP neurons (per block),
    query heads (per block, evenly from each KV group) and hidden channels (shared by every block)."""
    from transformers import AutoModelForCausalLM

    tc = teacher.config
    inter = intermediate_size or tc.intermediate_size
    hidden = hidden_size or tc.hidden_size
    nq = heads or tc.num_attention_heads
    for flag, (new, old, scores) in {"MLP width": (inter, tc.intermediate_size, neuron_scores),
                                     "hidden size": (hidden, tc.hidden_size, hidden_scores),
                                     "heads": (nq, tc.num_attention_heads, head_scores)}.items():
        if new < old and scores is None:
            raise EdgelmError(f"pruning the {flag} needs importance scores; compute them first (see build_student)")
    cfg = _shrunk_config(tc, keep_layers, inter, hidden, nq)
    head_dim = cfg.head_dim
    keep_hidden = _top(hidden_scores, hidden) if hidden < tc.hidden_size else None
    student = AutoModelForCausalLM.from_config(cfg, dtype=next(teacher.parameters()).dtype)
    prefix = BLOCK_NAMES["layers"] + "."
    new_state = {}
    for key, value in teacher.state_dict().items():
        value = value.detach().cpu()  # the student is built on the CPU (the trainer moves it)
        old = None
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            old = int(idx)
            if old not in keep_layers:
                continue
            key = f"{prefix}{keep_layers.index(old)}.{rest}"
        index: dict[str, torch.Tensor | None] = {"hidden": keep_hidden, "mlp": None, "heads": None, "qkv": None,
                                                 "mlp2": None}
        if old is not None and inter < tc.intermediate_size:
            index["mlp"] = _top(neuron_scores[old], inter)
            index["mlp2"] = torch.cat([index["mlp"], tc.intermediate_size + index["mlp"]])  # gate rows, up rows
        if old is not None and nq < tc.num_attention_heads:
            kept = _kept_heads(head_scores[old], nq, tc.num_key_value_heads)  # [nq]
            index["heads"] = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # rows of kept heads
            kv_rows = torch.arange(2 * tc.num_key_value_heads * head_dim)  # every key and value row
            index["qkv"] = torch.cat([index["heads"], tc.num_attention_heads * head_dim + kv_rows])
        axes = _axes_of(key)
        if axes is None and any(v is not None for v in index.values()):
            raise EdgelmError(f"width pruning does not know the weight {key!r}; prune depth only (--layers) for this "
                              "model")
        for axis, kind in (axes or {}).items():
            if index[kind] is not None:
                value = value.index_select(axis, index[kind])
        new_state[key] = value.clone()
    if keep_hidden is not None:
        _keep_embedding_scale(new_state, tc.to_dict(), hidden)
    missing, unexpected = student.load_state_dict(new_state, strict=False)
    # Tied embeddings show up as a missing lm_head; anything else is a bug in the name table.
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise EdgelmError(f"pruning left weights unmatched (missing {missing[:3]}, unexpected {unexpected[:3]})")
    student.eval()
    return student


def _keep_embedding_scale(state: dict[str, torch.Tensor], cfg: dict, hidden: int) -> None:
    """An arch that scales its embeddings by sqrt(hidden) (Gemma) scales a narrower student's by less: the kept
    embedding rows are multiplied by c = sqrt(old / new) to make up for it, and the final norm's scale divided by c,
    so the tied lm_head's logits stay as they were."""
    import math

    from edgelm.models.archs import get_arch

    arch = get_arch(cfg.get("model_type"))
    if not arch.embed_scale:
        return
    c = math.sqrt(cfg["hidden_size"] / hidden)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * c
    norm = state["model.norm.weight"]
    state["model.norm.weight"] = (arch.norm_offset + norm) / c - arch.norm_offset
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same matrix: loaded after the embedding, it would undo the scaling
    elif "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"] * c  # an untied head: its input was divided by c


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

    tc = teacher.config
    n_layers = spec.layers or tc.num_hidden_layers
    scores = layer_importance(teacher, calib)
    keep = choose_layers(scores, n_layers)
    info.update(layer_importance=[round(s, 6) for s in scores], kept_layers=keep)
    inter = spec.intermediate_size or tc.intermediate_size
    hidden = spec.hidden_size or tc.hidden_size
    heads = spec.heads or tc.num_attention_heads
    neuron_scores = mlp_neuron_importance(teacher, calib) if inter < tc.intermediate_size else None
    hidden_scores = hidden_importance(teacher, calib) if hidden < tc.hidden_size else None
    head_scores = head_importance(teacher, calib) if heads < tc.num_attention_heads else None
    student = prune(teacher, keep, inter, neuron_scores, hidden_size=hidden, hidden_scores=hidden_scores,
                    heads=heads, head_scores=head_scores)
    if spec.init == "random":
        fresh = AutoModelForCausalLM.from_config(student.config)
        fresh.eval()
        student = fresh
    log.info("student: %d of %d layers %s, hidden %d, %d heads, MLP width %d, init %s", len(keep),
             tc.num_hidden_layers, keep, hidden, heads, inter, spec.init)
    return student, info


def count_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
