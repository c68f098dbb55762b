"""The GPTQ checkpoint format (v1, as GPTQModel, transformers and onnxruntime-genai read it): what quantization
writes (edgelm.quant), what the exporters pack (edgelm.converters) and what the PyTorch runtime dequantizes.

A quantized linear layer holds integer codes q, fp16 scales s and integer zeros z per group; its weight is
``W[o, i] = s[o, g(i)] * (q[o, i] - z[o, g(i)])``. On disk (v1): qweight int32 [in*bits/32, out] packs codes along
the input axis, qzeros int32 [G, out*bits/32] packs ``z - 1`` along the output axis, scales fp16 [G, out],
g_idx int32 [in]. Every exporter reads :class:`QLinear` and packs these exact values.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
# Linear layers that weight-only presets quantize: the Llama block's, and Phi-3's fused ones (edgelm.models.archs
# Arch.linears); lm_head and embeddings stay float, except in mixed plans (edgelm.quant.mixed), which also quantize
# the lm_head.
QUANT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                 "gate_up_proj")


@dataclass
class QLinear:
    codes: "torch.Tensor"  # uint8 [out, in], 0 .. 2^bits-1
    scales: "torch.Tensor"  # float16 [out, G]
    zeros: "torch.Tensor"  # uint8 [out, G]
    g_idx: "torch.Tensor"  # int32 [in], group of each input column
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> "torch.Tensor":
        """float32 [out, in]; the fp16 scale is widened first, as ggml and ONNX Runtime do."""
        g = self.g_idx.long()
        s = self.scales.float()[:, g]  # [out, in]
        z = self.zeros.float()[:, g]
        return s * (self.codes.float() - z)

    def contiguous_groups(self) -> int | None:
        """The group size if every group is a contiguous run of columns (what block formats need), else None."""
        import torch

        n_in, n_groups = self.codes.shape[1], self.scales.shape[1]
        if n_in % n_groups:
            return None
        gs = n_in // n_groups
        return gs if torch.equal(self.g_idx.long(), torch.arange(n_in) // gs) else None


def stack_rows(parts: list[QLinear]) -> QLinear:
    """Linears that read the same input as one whose output rows are theirs in order (Phi-3's gate_up_proj from a
    gate_proj and an up_proj): the same codes, scales and zeros, exactly."""
    import torch

    first = parts[0]
    if any(p.bits != first.bits or not torch.equal(p.g_idx, first.g_idx) for p in parts):
        raise EdgelmError("linears with different bits or groups can't be stacked into one")
    return QLinear(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                   torch.cat([p.zeros for p in parts]), first.g_idx, first.bits)


class StackedParts(Mapping):
    """A model's own fused projections over a checkpoint that quantized their parts apart (GPTQModel loads Phi-3's
    gate_up_proj as a gate_proj and an up_proj: the same input, so their rows stack exactly): the parts' codes
    stacked when the fused module is read. ``fused``: an Arch's (fused name, parts) pairs."""

    def __init__(self, qlinears: Mapping[str, QLinear], fused: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        self._q = qlinears
        self._stacked: dict[str, list[str]] = {}
        for whole, parts in fused:
            for name in [n for n in qlinears if n.endswith("." + parts[0])]:
                head = name[: -len(parts[0])]
                if all(head + p in qlinears for p in parts):
                    self._stacked[head + whole] = [head + p for p in parts]
        hidden = {p for ps in self._stacked.values() for p in ps}
        self._names = sorted([n for n in qlinears if n not in hidden] + list(self._stacked))

    def __getitem__(self, module: str) -> QLinear:
        if module in self._stacked:
            return stack_rows([self._q[p] for p in self._stacked[module]])
        if module not in self._names:
            raise KeyError(module)
        return self._q[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def container_bits(bits: int) -> int:
    """Bits each code takes when packed: GPTQ packs 2/4/8-bit codes densely; 5- and 6-bit codes (mixed plans only,
    which no GPTQ packing defines) take a byte each."""
    return bits if 32 % bits == 0 else 8


def _pack(values: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Pack non-negative ints along dim 0: [n, m] -> int32 [n*bits/32, m] (code k of a word in bits k*b..)."""
    import torch

    bits = container_bits(bits)
    per = 32 // bits
    if bits in (4, 8):  # byte views: the words' little-endian bytes, two 4-bit codes (low nibble first) or one
        v = values.to(torch.uint8).reshape(-1, per, values.shape[1]).permute(0, 2, 1)  # [n/per, m, per]
        b = v[..., 0::2] | (v[..., 1::2] << 4) if bits == 4 else v  # [n/per, m, 4]
        return b.contiguous().flatten().view(torch.int32).reshape(-1, values.shape[1])
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])  # [n/per, per, m]
    shifts = (torch.arange(per, dtype=torch.int64) * bits)[None, :, None]
    packed = (v << shifts).sum(1)  # [n/per, m], fits in uint32
    return (packed - (packed >= 2**31).long() * 2**32).to(torch.int32)


def _unpack(packed: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Inverse of :func:`_pack`: int32 [n, m] -> uint8 [n*32/bits, m]."""
    import torch

    bits = container_bits(bits)
    per = 32 // bits
    n, m = packed.shape
    if bits in (4, 8):
        b = packed.contiguous().flatten().view(torch.uint8).reshape(n, m, 4)  # each word's bytes, little-endian
        v = torch.stack((b & 0x0F, b >> 4), -1).reshape(n, m, 8) if bits == 4 else b  # [n, m, per]
        return v.permute(0, 2, 1).reshape(-1, m)
    p = packed.to(torch.int64) & 0xFFFFFFFF  # [n, m]
    shifts = (torch.arange(per, dtype=torch.int64) * bits)[None, :, None]
    v = (p[:, None, :] >> shifts) & (2**bits - 1)  # [n, per, m]
    return v.reshape(-1, m).to(torch.uint8)


def pack_gptq(ql: QLinear) -> dict[str, "torch.Tensor"]:
    """QLinear -> GPTQ v1 tensors (zeros stored minus one)."""
    if ql.bits not in (4, 5, 8):
        raise EdgelmError(f"GPTQ packing supports 4 and 8 bits (5 bits one per byte), got {ql.bits}")
    stored_zeros = (ql.zeros.long() - 1) & (2**ql.bits - 1)
    return {"qweight": _pack(ql.codes.T.contiguous(), ql.bits), "qzeros": _pack_zeros(stored_zeros, ql.bits),
            "scales": ql.scales.T.contiguous(), "g_idx": ql.g_idx}


def _pack_zeros(z: "torch.Tensor", bits: int) -> "torch.Tensor":
    # z: [out, G] -> int32 [G, out*bits/32], packed along the output axis
    return _pack(z, bits).T.contiguous()


def unpack_gptq(t: dict[str, "torch.Tensor"], bits: int, *, v1: bool = True) -> QLinear:
    """GPTQ tensors (qweight, qzeros, scales, g_idx) -> QLinear. ``v1``: zeros are stored minus one."""
    import torch

    codes = _unpack(t["qweight"], bits).T.contiguous()  # [out, in]
    zeros = _unpack(t["qzeros"].T.contiguous(), bits).contiguous()  # [out, G]
    if v1:
        zeros = (zeros + 1) & (2**bits - 1)
    out_f = t["scales"].shape[1]
    return QLinear(codes[:out_f].to(torch.uint8), t["scales"].T.contiguous().half(), zeros[:out_f].to(torch.uint8),
                   t["g_idx"].to(torch.int32), bits)


def quantized_linears(model) -> list[str]:
    """Module names of the linear layers weight-only presets quantize, in model order."""
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in QUANT_LINEARS and hasattr(m, "weight")]


def save_quantized(folder: Path, model, tokenizer, qlinears: dict[str, QLinear], qcfg: dict[str, Any]) -> None:
    """Write a GPTQ-format HF folder: float tensors as in ``model``, quantized linears packed."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        sd.pop("lm_head.weight", None)
    for name, ql in qlinears.items():
        sd.pop(f"{name}.weight", None)
        for k, v in pack_gptq(ql).items():
            sd[f"{name}.{k}"] = v
    if tied and "lm_head" in qlinears:  # the embedding is the same matrix: keep its dequantized values
        emb = model.get_input_embeddings()
        key = next(k for k, p in model.named_parameters(remove_duplicate=False) if p is emb.weight)
        sd[key] = qlinears["lm_head"].dequantize()
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "checkpoint_format": "gptq", "lm_head": "lm_head" in qlinears,
                                  "desc_act": False, **qcfg}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
    tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


class LazyQLinears(Mapping):
    """module -> QLinear of a GPTQ-format folder, each read and unpacked when it is asked for (a model of any size:
    one linear's codes in memory at a time)."""

    PARTS = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, files: list[Path], q: dict[str, Any]) -> None:
        from edgelm.models.weights import LazySafetensors

        self._raw = LazySafetensors(files, floats_only=False, only=lambda n: n.rsplit(".", 1)[-1] in self.PARTS)
        self._q, self._v1 = q, q.get("checkpoint_format", "gptq") == "gptq"
        self._modules = sorted({n.rsplit(".", 1)[0] for n in self._raw if n.endswith(".qweight")})

    def __getitem__(self, module: str) -> QLinear:
        if module not in self._modules:
            raise KeyError(module)
        parts = {p: self._raw.raw(f"{module}.{p}") for p in self.PARTS}
        return unpack_gptq(parts, module_bits(self._q, module), v1=self._v1)

    def shape(self, module: str) -> tuple[int, int]:
        """(out, in) without reading the codes."""
        return self._raw.shape(f"{module}.scales")[1], self._raw.shape(f"{module}.g_idx")[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def write_quantized(src: Path, tmp: Path, modules: set[str], qlinear: Callable[[str], QLinear], qcfg: dict[str, Any],
                    *, desc: str = "quantize") -> None:
    """The GPTQ-format checkpoint of the float HF folder ``src`` in the empty folder ``tmp``, a tensor at a time:
    each of ``modules`` as ``qlinear(module)`` gives its codes (computed or read only then), packed; every other
    tensor copied as stored (bf16 stays bf16); shards of edgelm.models.weights.ShardWriter; then config.json with
    its quantization_config, and the tokenizer and generation config as they are."""
    import shutil

    from edgelm.models.weights import LazySafetensors, ShardWriter, safetensors_files
    from edgelm.report import progress

    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    tensors = LazySafetensors(safetensors_files(src))
    writer = ShardWriter(tmp)
    for name in progress(list(tensors), desc=desc, unit="tensor"):
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # the embedding's matrix
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in modules:
            for part, t in pack_gptq(qlinear(module)).items():
                writer.add(f"{module}.{part}", t)
        else:
            writer.add(name, tensors.raw(name))
    writer.close()
    cfg["quantization_config"] = {"quant_method": "gptq", "checkpoint_format": "gptq", "lm_head": False,
                                  "desc_act": False, **qcfg}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template"))
                            or f.suffix in (".model", ".tiktoken")):
            shutil.copyfile(f, tmp / f.name)


def linear_weights(names) -> list[str]:
    """The weight names of the linears weight-only presets quantize, among a checkpoint's tensor names."""
    return [n for n in names if n.endswith(".weight") and ".layers." in n and n.rsplit(".", 2)[-2] in QUANT_LINEARS]


def read_quantized(folder: str | Path) -> tuple[dict, Mapping[str, "torch.Tensor"], Mapping[str, QLinear]]:
    """(config dict, float tensors as float32, QLinear per module) of a GPTQ-format folder; tensors and linears are
    read when they are asked for."""
    from edgelm.models.weights import LazySafetensors, safetensors_files

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "gptq":
        raise EdgelmError(f"{folder} is not a GPTQ-format checkpoint (quantization_config.quant_method != 'gptq')")
    files = safetensors_files(folder)
    qlinears = LazyQLinears(files, q)
    tensors = LazySafetensors(files, floats_only=False,
                              only=lambda n: n.rsplit(".", 1)[-1] not in LazyQLinears.PARTS)
    return cfg, tensors, qlinears


def dynamic_pattern(module: str) -> str:
    """A GPTQModel-style ``dynamic`` key for one module, matching its name and its tensors' (``NAME.qweight``), as
    GPTQModel and onnxruntime-genai's builder both match them (``re.match``)."""
    import re

    return f"+:^{re.escape(module)}(\\.|$)"


def module_bits(q: dict[str, Any], name: str) -> int:
    """A module's bits: the checkpoint's, unless a GPTQModel-style ``dynamic`` rule ("+:regex" -> {"bits": b}) that
    matches the module name overrides them (mixed plans write one per module)."""
    import re

    for pattern, override in (q.get("dynamic") or {}).items():
        if pattern.startswith("+:") and re.match(pattern[2:], name) and "bits" in override:
            return int(override["bits"])
    return int(q["bits"])


def load_quantized_model(folder: str | Path):
    """A float32 HF model whose quantized linears hold their dequantized values (for evaluation and export)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, tensors, qlinears = read_quantized(folder)
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    values = [(k, lambda k=k: tensors[k]) for k in tensors]
    values += [(f"{n}.weight", lambda n=n: qlinears[n].dequantize()) for n in qlinears]
    unexpected = [k for k, _ in values if k not in expected]
    loaded = {k for k, _ in values}
    missing = [m for m in expected - loaded if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise EdgelmError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, value in values:  # one tensor read at a time
            state[k].copy_(value())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
