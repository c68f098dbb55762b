"""Mixed precision: one 32-wide block type per tensor, allocated by measured sensitivity under a byte budget.

1. One forward pass of the fp32 model over the calibration set (train split) gathers each linear's input Hessian,
   and the final norm's for the lm_head (which, when tied, is also the embedding).
2. Every tensor is quantized onto every allowed grid with edgelm's GPTQ step (edgelm.quant.solver).
3. Sensitivity: the KL divergence from the fp32 model when that tensor alone sits on the cheapest grid, measured on
   calibration sequences; the other grids scale it by their GPTQ loss (the Hessian-weighted error) against the
   cheapest's.
4. A greedy knapsack upgrades, at each step, the tensor whose next grid buys the most KL divergence per byte, while
   the plan fits the budget. The chosen codes are the ones already solved in step 2: no second rounding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError
from edgelm.quant.grids import BLOCK, BLOCK_TYPES, BlockType
from edgelm.quant.hessian import LM_HEAD, collect_hessians

if TYPE_CHECKING:
    import numpy as np
    import torch

    from edgelm.models.qformat import QLinear

log = logging.getLogger(__name__)


@dataclass
class TensorPlan:
    name: str  # module name (LM_HEAD for the output / tied embedding)
    shape: tuple[int, int]  # [out, in]
    kld: dict[str, float] = field(default_factory=dict)  # type -> predicted KL increase at it (empty: one type)
    loss: dict[str, float] = field(default_factory=dict)  # type -> GPTQ's Hessian-weighted loss
    choice: str = ""  # the chosen type

    def nbytes(self, t: str) -> int:
        return self.shape[0] * self.shape[1] // BLOCK * BLOCK_TYPES[t].block_bytes


@dataclass
class MixedPlan:
    tensors: list[TensorPlan]
    budget_bytes: int  # what the planned tensors may take
    other_bytes: int  # what the rest of the file takes (norms in F32; an untied embedding at Q8_0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes(t.choice) for t in self.tensors)

    @property
    def weights(self) -> int:
        return sum(t.shape[0] * t.shape[1] for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.weights

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.choice] = out.get(t.choice, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: BLOCK_TYPES[kv[0]].bpw))

    def summary(self) -> str:
        """One line, e.g. "62 x Q4_0, 18 x Q8_0, 5.12 bits/weight, 53.4 MiB of tensors"."""
        parts = ", ".join(f"{n} x {t}" for t, n in self.counts().items())
        return f"{parts}, {self.bpw:.2f} bits/weight, {(self.nbytes + self.other_bytes) / 2**20:.1f} MiB of tensors"

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "bits_per_weight": round(self.bpw, 4), "bytes": self.nbytes,
                "budget_bytes": self.budget_bytes, "other_bytes": self.other_bytes,
                # None for a one-type plan, whose tensors' costs were not measured (nothing to choose)
                "predicted_kld": round(sum(t.kld[t.choice] for t in self.tensors), 5) if all(
                    t.kld for t in self.tensors) else None,
                "tensors": {t.name: {"type": t.choice, "kld": {k: round(v, 6) for k, v in t.kld.items()}}
                            for t in self.tensors}}


def planned_matrices(model) -> dict[str, "torch.Tensor"]:
    """Module name -> weight [out, in] of every tensor the plan covers: the quantizable linears, then the lm_head."""
    from edgelm.models.qformat import quantized_linears

    out = {n: model.get_submodule(n).weight for n in quantized_linears(model)}
    out[LM_HEAD] = model.get_output_embeddings().weight
    return out


def other_bytes(model, planned: dict[str, "torch.Tensor"]) -> int:
    """Bytes of what the plan does not cover, as the GGUF writer stores it (1-D in F32, 2-D at Q8_0)."""
    seen = {id(p) for p in planned.values()}
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * 4 if p.dim() < 2 else p.numel() // BLOCK * BLOCK_TYPES["Q8_0"].block_bytes
    return total


def budget_range(shapes: dict[str, tuple[int, int]], types: tuple[str, ...]) -> tuple[int, int]:
    """(smallest, largest) bytes a plan over ``shapes`` can take with ``types``."""
    per = [BLOCK_TYPES[t].block_bytes for t in types]
    blocks = sum(o * i // BLOCK for o, i in shapes.values())
    return blocks * min(per), blocks * max(per)


def resolve_budget(shapes: dict[str, tuple[int, int]], types: tuple[str, ...], *, budget_bpw: float, max_mib: float,
                   other: int) -> int:
    """The byte budget of the planned tensors, or a one-line error naming the reachable range."""
    lo, hi = budget_range(shapes, types)
    weights = sum(o * i for o, i in shapes.values())
    if max_mib > 0:
        budget = int(max_mib * 2**20) - other
        if budget < lo or budget > hi:
            raise EdgelmError(f"--max-size {max_mib:g} MiB is outside what {', '.join(types)} can reach on this model: "
                              f"{(lo + other) / 2**20:.1f} to {(hi + other) / 2**20:.1f} MiB")
        return budget
    budget = int(budget_bpw * weights / 8)
    if budget < lo or budget > hi:
        raise EdgelmError(f"--budget-bpw {budget_bpw:g} is outside what {', '.join(types)} can reach on this model: "
                          f"{8 * lo / weights:.2f} to {8 * hi / weights:.2f} bits/weight")
    return budget


class KldProbe:
    """KL(fp32 || model with one matrix replaced) on a few calibration sequences; the fp32 log-probs are kept."""

    def __init__(self, model, seqs: "np.ndarray") -> None:
        import torch

        self.model, self.ids = model, torch.as_tensor(seqs)  # [N, T]
        with torch.no_grad():
            self.ref = [torch.log_softmax(model(input_ids=i[None]).logits[0].float(), -1) for i in self.ids]  # [T, V]

    def __call__(self, weight: "torch.Tensor", value: "torch.Tensor") -> float:
        import torch

        saved = weight.data
        weight.data = value  # a tied embedding shares this Parameter with the lm_head: both change
        try:
            kl = 0.0
            with torch.no_grad():
                for i, ref in zip(self.ids, self.ref):
                    cur = torch.log_softmax(self.model(input_ids=i[None]).logits[0].float(), -1)
                    kl += float((ref.exp() * (ref - cur)).sum(-1).mean())
        finally:
            weight.data = saved
        return kl / len(self.ids)


# tensors that must share a type: ONNX fuses q/k/v into one MatMulNBits (they also share one input Hessian)
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv"}


def _group_key(name: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix}.{FUSED[leaf]}" if leaf in FUSED else name


def allocate(tensors: list[TensorPlan], types: tuple[str, ...], budget: int) -> None:
    """Greedy knapsack: start at the cheapest type, then take the upgrade with the best KL saved per extra byte
    that still fits, until none does. Fused tensors (q/k/v) move together. Sets each tensor's ``choice``."""
    groups: dict[str, list[TensorPlan]] = {}
    for t in tensors:
        groups.setdefault(_group_key(t.name), []).append(t)
    cost = {g: {ty: sum(t.nbytes(ty) for t in ts) for ty in types} for g, ts in groups.items()}
    kld = {g: {ty: sum(t.kld[ty] for t in ts) for ty in types} for g, ts in groups.items()} if len(types) > 1 else {}
    choice = {g: min(types, key=_bytes) for g in groups}
    used = sum(cost[g][choice[g]] for g in groups)
    while len(types) > 1:
        best = None
        for g in groups:
            cur = choice[g]
            for ty in types:
                extra, gain = cost[g][ty] - cost[g][cur], kld[g][cur] - kld[g][ty]
                if extra <= 0 or gain <= 0 or used + extra > budget:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, g, ty, extra)
        if best is None:
            break
        _, g, ty, extra = best
        choice[g], used = ty, used + extra
    for g, ts in groups.items():
        for t in ts:
            t.choice = choice[g]


@dataclass
class Sensitivity:
    """What a plan is chosen from: every planned tensor solved on every allowed grid, with its measured KL cost."""
    tensors: list[TensorPlan]
    solved: dict[tuple[str, str], "QLinear"]  # (module, type) -> codes
    types: tuple[str, ...]
    other: int  # bytes outside the plan

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {t.name: t.shape for t in self.tensors}

    def choose(self, *, budget_bpw: float = 0.0, max_mib: float = 0.0,
               types: tuple[str, ...] = ()) -> tuple[MixedPlan, dict[str, "QLinear"]]:
        """The plan for one budget (over ``types``, a subset of the measured ones; default all), and the QLinear of
        each planned module at its chosen type."""
        import copy

        types = types or self.types
        if set(types) - set(self.types) or min(types, key=_bytes) != min(self.types, key=_bytes):
            raise EdgelmError(f"a plan over {', '.join(types)} needs the sensitivity measured on them, with the same "
                              f"cheapest type; measured: {', '.join(self.types)}")
        budget = resolve_budget(self.shapes, types, budget_bpw=budget_bpw, max_mib=max_mib, other=self.other)
        tensors = copy.deepcopy(self.tensors)
        allocate(tensors, types, budget)
        return MixedPlan(tensors, budget, self.other), {t.name: self.solved[(t.name, t.choice)] for t in tensors}


def _bytes(t: str) -> int:
    return BLOCK_TYPES[t].block_bytes


def check_plannable(model, types: tuple[str, ...], *, budget_bpw: float = 0.0, max_mib: float = 0.0) -> None:
    """Refuse unknown types, widths no 32-wide block takes, and unreachable budgets, before any work starts."""
    bad = [t for t in types if t not in BLOCK_TYPES]
    if bad or not types:
        raise EdgelmError(f"unknown block type(s) {bad}; mixed plans take {', '.join(BLOCK_TYPES)}")
    planned = planned_matrices(model)
    shapes = {n: tuple(w.shape) for n, w in planned.items()}
    for n, (_, cols) in shapes.items():
        if cols % BLOCK:
            raise EdgelmError(f"{n} has {cols} input columns, not a multiple of {BLOCK}; 32-wide block types can't hold it")
    resolve_budget(shapes, types, budget_bpw=budget_bpw, max_mib=max_mib, other=other_bytes(model, planned))


def measure_sensitivity(model, calib: "np.ndarray", types: tuple[str, ...], *, damp: float = 0.05,
                        sens_seqs: int = 4, sens_len: int = 256) -> Sensitivity:
    """Steps 1-3: Hessians, every grid solved, the KL cost of each tensor alone on the cheapest grid."""
    import time

    from edgelm.quant.solver import gptq_solve

    planned = planned_matrices(model)
    t0 = time.perf_counter()
    hess = collect_hessians(model, calib)
    log.info("mixed: Hessians of %d matrices from %d x %d calibration tokens (%.0f s)", len(planned), *calib.shape,
             time.perf_counter() - t0)
    cheapest = min(types, key=lambda t: BLOCK_TYPES[t].block_bytes)
    # one type leaves nothing to choose: its plan needs the codes only, not what each tensor costs
    probe = KldProbe(model, calib[:sens_seqs, :sens_len]) if len(types) > 1 else None
    solved: dict[tuple[str, str], QLinear] = {}
    plans = []
    for n, w in planned.items():
        tp = TensorPlan(n, tuple(w.shape))
        for ty in types:
            bt: BlockType = BLOCK_TYPES[ty]
            r = gptq_solve(w.data, hess[n], bt.bits, bt.sym, damp=damp)
            solved[(n, ty)], tp.loss[ty] = r.qlinear, r.loss
        if probe is not None:
            base = max(probe(w, solved[(n, cheapest)].dequantize()), 0.0)
            ref_loss = tp.loss[cheapest]
            tp.kld = {ty: base * (tp.loss[ty] / ref_loss if ref_loss > 0 else 0.0) for ty in types}
            log.debug("mixed: %s KLD at %s %.5f", n, cheapest, base)
        plans.append(tp)
    log.info("mixed: %s of %d tensors on %s (%.0f s)", "sensitivity" if probe else "GPTQ codes", len(plans),
             ", ".join(types), time.perf_counter() - t0)
    return Sensitivity(plans, solved, tuple(types), other_bytes(model, planned))


def save_mixed(folder, model, tokenizer, plan: MixedPlan, qlinears: dict[str, "QLinear"], group_size: int) -> None:
    """A GPTQ-format folder whose per-module bits are GPTQModel-style ``dynamic`` rules."""
    from edgelm.models.qformat import dynamic_pattern, save_quantized
    from edgelm.quant.grids import type_of

    dynamic = {}
    for name, ql in qlinears.items():
        t = type_of(ql)
        dynamic[dynamic_pattern(name)] = {"bits": t.bits, "sym": t.sym, "group_size": ql.contiguous_groups()}
    main = max(plan.counts().items(), key=lambda kv: kv[1])[0]
    bt = BLOCK_TYPES[main]
    save_quantized(folder, model, tokenizer, qlinears, {"bits": bt.bits, "group_size": group_size, "sym": bt.sym,
                                                        "dynamic": dynamic})
