"""One registry per extension point. Built-ins and user plugins register the same way:

    from edgelm.registry import KD_LOSSES, ROUTERS

    @KD_LOSSES.register("my-loss")          # a function: the name is given once, here
    def my_loss(student_logits, teacher_logits, *, temperature, beta): ...

    @ROUTERS.register                       # an object with a ``name``: the name is taken from it
    class MyRouter(Router):
        name = "mine"

Built-ins live in modules that are imported on first lookup, so `import edgelm` stays light.
Third-party packages can also expose an ``edgelm.plugins`` entry point (a module to import).
"""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, Generic, Iterator, TypeVar

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

    def __init__(self, kind: str, builtins: str | tuple[str, ...] = ()) -> None:
        self.kind = kind  # shown in errors, e.g. "KD loss"
        # modules that register the built-ins when first imported
        self.builtins = (builtins,) if isinstance(builtins, str) else tuple(builtins)
        self._pending = list(self.builtins)  # not imported yet
        self._items: dict[str, T] = {}

    def _load(self) -> None:
        while self._pending:
            importlib.import_module(self._pending.pop(0))
        load_plugins()

    def register(self, name: Any = None, obj: T | None = None, *, overwrite: bool = False) -> Any:
        """``register(obj)`` or ``@register``: under ``obj.name``. ``register("name", obj)`` or
        ``@register("name")``: under that name (for objects without a ``name``, such as functions)."""

        def add(o: T, key: str | None = None) -> T:
            key = key or getattr(o, "name", None)
            if not isinstance(key, str) or not key:
                raise EdgelmError(f"a {self.kind} needs a name: give it a `name` attribute or register it as "
                                  f"register('name', obj)")
            if key in self._items and not overwrite:
                raise EdgelmError(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
            self._items[key] = o
            return o

        if isinstance(name, str):
            return (lambda o: add(o, name)) if obj is None else add(obj, name)
        if name is None:
            return add
        return add(name)

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
ARCHS: Registry = Registry("architecture", builtins="edgelm.models.archs")
QUANTS: Registry = Registry("quant preset", builtins="edgelm.quant.presets")
TARGETS: Registry = Registry("export target", builtins="edgelm.artifact.targets")
RUNTIMES: Registry = Registry("runtime", builtins="edgelm.runtimes.builtin")
ROUTERS: Registry = Registry("router", builtins=("edgelm.coop.routers", "edgelm.coop.learn"))
# `edgelm bench --device` kinds; the browser's lives with the app (it serves a page)
DEVICES: Registry = Registry("bench device", builtins=("edgelm.bench.devices", "edgelm.bench.remote",
                                                        "edgelm.bench.rpc", "edgelm.app.benchpage"))
