"""Named student shapes. Each overrides the teacher's config; vocab and tokenizer stay the teacher's.

Every matrix dimension is a multiple of 32 (block quantization), widths prefer multiples of 256 (K-quants).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgelm.registry import STUDENT_ZOO


@dataclass(frozen=True)
class StudentShape:
    num_hidden_layers: int  # decoder blocks
    hidden_size: int  # model width (row length of most matrices)
    intermediate_size: int  # MLP width
    num_attention_heads: int  # query heads; head_dim = hidden_size / heads
    num_key_value_heads: int  # KV heads (GQA)
    description: str  # one line for `edgelm list students`

    def overrides(self) -> dict[str, int]:
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
        }


for _name, _shape in {
    "nano": StudentShape(4, 256, 768, 4, 2, "4 layers x 256 wide, ~14M params with a 49k vocab"),
    "micro": StudentShape(8, 512, 1536, 8, 4, "8 layers x 512 wide, ~46M params with a 49k vocab"),
    "small": StudentShape(12, 768, 2048, 12, 4, "12 layers x 768 wide, ~120M params with a 49k vocab"),
}.items():
    STUDENT_ZOO.register(_name, _shape)
