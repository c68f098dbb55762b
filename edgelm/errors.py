"""User-facing errors: one line, saying what was wrong and how to fix it."""
from __future__ import annotations


class EdgelmError(Exception):
    """Bad input or a failed step the user can act on. The CLI prints it as one line, no traceback."""

    exit_code = 2


class UnknownNameError(EdgelmError, KeyError):
    """A registry lookup missed; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TrainingDiverged(EdgelmError):
    """The loss went NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(EdgelmError):
    """Ctrl-C during a run; a checkpoint was written to resume from."""

    exit_code = 130


def require(module: str, extra: str, note: str = ""):
    """Import an optional dependency, or fail with the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgelmError(f"{module} is not installed; pip install 'edgelm[{extra}]'{note}") from None


def require_llama_cpp():
    """llama-cpp-python, used by the GGUF exporter (llama.cpp's quantizer) and the llama.cpp runtime."""
    return require("llama_cpp", "llamacpp", " (llama-cpp-python builds llama.cpp from source, about 16 minutes)")
