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

    def params(self, vocab: int) -> int:
        """Parameter count with tied embeddings (Llama block: attention, gated MLP, two norms)."""
        h, hd = self.hidden_size, self.hidden_size // self.num_attention_heads
        attn = 2 * h * h + 2 * h * self.num_key_value_heads * hd
        block = attn + 3 * h * self.intermediate_size + 2 * h
        return vocab * h + self.num_hidden_layers * block + h

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
    "nano": StudentShape(4, 256, 768, 4, 2, "4 layers x 256 wide, MLP 768"),
    "micro": StudentShape(8, 512, 1536, 8, 4, "8 layers x 512 wide, MLP 1536"),
    "small": StudentShape(12, 768, 2048, 12, 4, "12 layers x 768 wide, MLP 2048"),
}.items():
    STUDENT_ZOO.register(_name, _shape)
