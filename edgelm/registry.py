"""One registry per extension point. Built-ins and user plugins register the same way:

    from edgelm.registry import KD_LOSSES

    @KD_LOSSES.register("my-loss")
    def my_loss(student_logits, teacher_logits, *, temperature, beta): ...

Built-ins live in a module that is imported on first lookup, so `import edgelm` stays light.
Third-party packages can also expose an ``edgelm.plugins`` entry point (a module to import).
"""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from edgelm.errors import EdgelmError, UnknownNameError

log = logging.getLogger(__name__)
T = TypeVar("T")
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module named by an ``edgelm.plugins`` entry point, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="edgelm.plugins"):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must not break the CLI
            log.warning("edgelm plugin %s failed to load: %s", ep.name, e)


class Registry(Generic[T]):
    """Name -> object, with lazily imported built-ins and errors that list the known names."""

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind = kind  # shown in errors, e.g. "KD loss"
        self._builtins = builtins  # module that registers the built-ins when imported
        self._items: dict[str, T] = {}

    def _load(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None
            importlib.import_module(module)
        load_plugins()

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(o: T) -> T:
            if name in self._items and not overwrite:
                raise EdgelmError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items


KD_LOSSES: Registry = Registry("KD loss", builtins="edgelm.distill.losses")
STUDENT_ZOO: Registry = Registry("student config", builtins="edgelm.models.zoo")
TEACHERS: Registry = Registry("built-in teacher", builtins="edgelm.models.builtin")
QUANTS: Registry = Registry("quant preset", builtins="edgelm.quant.presets")
TARGETS: Registry = Registry("export target", builtins="edgelm.artifact.targets")
RUNTIMES: Registry = Registry("runtime", builtins="edgelm.runtimes.builtin")
ROUTERS: Registry = Registry("router", builtins="edgelm.coop.routers")
