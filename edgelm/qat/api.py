"""`edgelm qat`: the distillation trainer in its QAT mode. Every planned matrix (the linears; in the `-all` and mixed
plans the lm_head and the tied embedding too) trains through a fake quantizer on its exact target grid
(edgelm.qat.fake), with logit KD against the float model; the run writes a GPTQ-format checkpoint of the codes the
forward used, which `edgelm export` packs into GGUF, ONNX and TVM without rounding again."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.distill.trainer import DistillResult
    from edgelm.qat.config import QatConfig
    from edgelm.quant.grids import BlockType

log = logging.getLogger(__name__)


def qat(config: "QatConfig | None" = None, **kwargs: Any) -> "DistillResult":
    """Train ``model`` onto a preset's grids; keyword arguments are :class:`edgelm.QatConfig` fields. The result's
    ``student_dir`` is the quantized checkpoint (export it with ``--quant`` the preset)."""
    from edgelm.distill.trainer import distill
    from edgelm.qat.config import QatConfig

    if config is None:
        config = QatConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either a QatConfig or keyword arguments, not both")
    return distill(config)


@dataclass
class _Fake:
    name: str  # module name (LM_HEAD for the output matrix, and the embedding when tied)
    modules: list[Any]  # the modules whose weight it parametrizes (the lm_head and a tied embedding share one)
    fq: Any  # GridFakeQuant

    @property
    def latent(self):
        """The float weight the optimizer trains: the parametrization's original."""
        return self.modules[0].parametrizations.weight.original


class QatMode:
    """The trainer's QAT mode: fake quantizers on the student before training (and before a checkpoint loads into
    it), no weight decay on their scales, and a quantized checkpoint instead of a float student."""

    name = "qat"
    output = "quantized"  # the run's output folder

    def __init__(self, cfg: "QatConfig") -> None:
        self.cfg = cfg
        self.preset = cfg.preset()
        self.start = _start_manifest(cfg, self.preset.name) if cfg.start else None
        self.fakes: list[_Fake] = []
        self.t0 = time.perf_counter()

    def plan(self, student) -> dict[str, "BlockType"]:
        """Module -> block type of every matrix trained onto a grid: a mixed plan's tensors (the lm_head included;
        the types of --start's plan), or the linears at the preset's type."""
        from edgelm.models.qformat import quantized_linears
        from edgelm.quant.grids import BLOCK_TYPES, BY_CODES
        from edgelm.quant.mixed import planned_matrices

        p = self.preset
        if p.method != "mixed":
            return {n: BY_CODES[(p.bits, p.sym)] for n in quantized_linears(student)}
        names = list(planned_matrices(student))
        if self.start is None:
            return {n: BLOCK_TYPES[p.types[0]] for n in names}
        tensors = (self.start.get("plan") or {}).get("tensors") or {}
        missing = [n for n in names if n not in tensors]
        if missing:
            raise EdgelmError(f"--start {self.cfg.start} has no plan for {missing[0]} ({len(missing)} of {len(names)} "
                              "tensors); quantize MODEL again with the preset")
        return {n: BLOCK_TYPES[tensors[n]["type"]] for n in names}

    def prepare(self, student, *, resume: bool) -> None:
        """Register a fake quantizer on every planned matrix. A fresh run starts from --start's scales and zeros
        (checked against the plan) or a range search; a resumed one's are overwritten by the checkpoint."""
        from torch.nn.utils import parametrize

        from edgelm.models.qformat import read_quantized
        from edgelm.qat.fake import GridFakeQuant
        from edgelm.quant.grids import BLOCK, type_of
        from edgelm.quant.hessian import LM_HEAD

        plan = self.plan(student)
        start = read_quantized(self.cfg.start)[2] if self.start is not None and not resume else None
        tied = getattr(student.config, "tie_word_embeddings", False)
        self.fakes = []
        for name, bt in plan.items():
            if name == LM_HEAD:
                modules = [student.get_output_embeddings()] + ([student.get_input_embeddings()] if tied else [])
            else:
                modules = [student.get_submodule(name)]
            w = modules[0].weight.detach()
            if start is not None:
                if name not in start:
                    raise EdgelmError(f"--start {self.cfg.start} holds no codes for {name}; quantize MODEL with "
                                      f"--quant {self.preset.name} and pass that folder")
                ql = start[name]
                if ql.contiguous_groups() != BLOCK or type_of(ql) != bt or ql.shape != tuple(w.shape):
                    raise EdgelmError(f"--start {self.cfg.start}: {name} is not on {bt.name} in groups of {BLOCK} "
                                      f"with shape {tuple(w.shape)}; its grid does not match {self.preset.name}")
                fq = GridFakeQuant.from_qlinear(ql, bt, self.cfg.scales)
            else:
                fq = GridFakeQuant.from_weight(w, bt, self.cfg.scales)
            for m in modules:  # a tied embedding and lm_head share the quantizer and its original weight
                parametrize.register_parametrization(m, "weight", fq)
            self.fakes.append(_Fake(name, modules, fq))
        log.info("QAT: %d matrices on %s, scales %s, from %s", len(self.fakes),
                 ", ".join(sorted({bt.name for bt in plan.values()})), self.cfg.scales,
                 self.cfg.start or "a per-group range search")

    @staticmethod
    def no_decay(name: str) -> bool:
        """Parameters kept out of weight decay: the quantizers' scales."""
        return ".parametrizations.weight.0." in name

    def write(self, tmp: Path, student, tok, fields: dict[str, Any]) -> dict[str, Any]:
        """The quantized checkpoint of the trained weights in ``tmp``: the exact codes and fp16 scales of the fake
        quantizers, the rest as trained; its manifest records the run and the quality loss against MODEL."""
        from torch.nn.utils import parametrize

        from edgelm.manifest import write_manifest
        from edgelm.models.loader import resolve
        from edgelm.models.qformat import save_quantized
        from edgelm.quant.mixed import save_mixed
        from edgelm.quant.quality import quality_vs_reference

        student.to("cpu")
        qlinears = {f.name: f.fq.qlinear(f.latent) for f in self.fakes}
        for f in self.fakes:
            for m in f.modules:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        p = self.preset
        plan = None
        if p.method == "mixed":
            plan = _plan(student, qlinears)
            save_mixed(tmp, student, tok, plan, qlinears, p.group_size)
        else:
            save_quantized(tmp, student, tok, qlinears, {"bits": p.bits, "group_size": p.group_size, "sym": p.sym,
                                                         "desc_act": False})
        cfg = self.cfg
        quality = quality_vs_reference(cfg.model, tmp, data=cfg.data, text_field=cfg.text_field, n=cfg.eval_seqs,
                                       seq_len=cfg.seq_len).as_dict()
        src = resolve(cfg.model)
        training = fields["training"]
        return write_manifest(
            tmp, "quantized", source={"spec": src.spec, "kind": src.kind, "sha256": src.sha256},
            preset=self.start["preset"] if self.start else p.as_dict(), quality=quality,
            quantize_seconds=round(time.perf_counter() - self.t0, 2), **({"plan": plan.as_dict()} if plan else {}),
            qat={"tokens": training["tokens_seen"], "steps": training["steps"], "teacher": fields["source"]["teacher"],
                 "teacher_sha256": fields["source"]["teacher_sha256"], "start": cfg.start or None,
                 "start_quality": (self.start or {}).get("quality"), "scales": cfg.scales},
            teacher=fields["source"], **{k: v for k, v in fields.items() if k != "source"})


def _plan(student, qlinears):
    """The MixedPlan of trained codes: each tensor's type as its codes hold it (nothing left to choose)."""
    from edgelm.quant.grids import type_of
    from edgelm.quant.mixed import MixedPlan, TensorPlan, other_bytes, planned_matrices

    tensors = [TensorPlan(n, tuple(q.shape), choice=type_of(q).name) for n, q in qlinears.items()]
    plan = MixedPlan(tensors, 0, other_bytes(student, planned_matrices(student)))
    plan.budget_bytes = plan.nbytes
    return plan


def _start_manifest(cfg: "QatConfig", preset: str) -> dict[str, Any]:
    """--start's manifest, refused unless it is a quantized folder of MODEL with this preset."""
    import os

    from edgelm.manifest import read_manifest
    from edgelm.models.loader import resolve, same_weights

    if not os.path.isdir(cfg.start):
        raise EdgelmError(f"--start {cfg.start} is not a folder; pass an `edgelm quantize` output folder")
    m = read_manifest(cfg.start)  # refuses files that don't match it
    if not m or m.get("kind") != "quantized":
        raise EdgelmError(f"--start {cfg.start} is not an `edgelm quantize` folder (no quantized manifest); "
                          f"make one with: edgelm quantize {cfg.model} --quant {preset} --out FOLDER")
    name = m["preset"]["name"]
    if name != preset and not name.startswith(preset + "+"):
        raise EdgelmError(f"--start {cfg.start} was quantized with {name}, whose grid is not {preset}'s: pass "
                          f"--quant {name.split('+')[0]}, or quantize with --quant {preset}")
    src, theirs = resolve(cfg.model), m.get("source") or {}
    if not same_weights(src.sha256, src.spec, theirs.get("sha256"), theirs.get("spec")):
        raise EdgelmError(f"--start {cfg.start} was quantized from {theirs.get('spec')}, not {cfg.model}; pass the "
                          "model it was quantized from")
    return m
