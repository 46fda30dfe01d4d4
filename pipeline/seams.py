"""Seams: the names inside Composer, DeepSpeed and Streaming that this project relies on although
the libraries do not promise them (private functions and attributes, methods it overrides).

A seam is checked when the module that lists it is imported (``pipeline.streaming_seams``,
``pipeline.trainer.seams``): one ``SeamError`` names every seam that is missing or changed and the
library version the seams were written for, so an upgrade fails at start instead of silently
switching off what the seam was for (crash-safe saves, the NaN check, DeepSpeed's step...).
This module only holds the checking; it imports none of the libraries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The library (as seams name it) -> (its distribution, the version the seams were written for).
WRITTEN_FOR = {
    "composer": ("mosaicml", "0.32.1"),
    "deepspeed": ("deepspeed", "0.19.8"),
    "streaming": ("mosaicml-streaming", "0.13.0"),
}


class SeamError(RuntimeError):
    """An installed library no longer has a name this project relies on; the message is one line."""


@dataclass(frozen=True)
class Seam:
    """One name inside a library.

    ``owner`` is the module (``"package.module"``) or class (``"package.module:Class"``) that holds
    it. ``params``: a function or method, with exactly these parameter names. ``set_in``: an
    instance attribute, which ``owner.<set_in>`` must assign (``<target>.<name> = ...`` in its
    source). Otherwise an attribute ``owner`` defines itself (not inherits), which must pass ``probe``
    when one is given.
    ``why``: what breaks without it.
    """

    library: str
    owner: str
    name: str
    why: str
    params: tuple[str, ...] | None = None
    set_in: str | None = None
    target: str = "self"
    probe: Callable[[Any], bool] | None = None

    @property
    def label(self) -> str:
        """``Class.name`` or ``module.name``, as the error names it."""
        module, _, qualname = self.owner.partition(":")
        return f"{qualname or module}.{self.name}"

    def owner_object(self) -> Any:
        """The module or class ``owner`` names (``"package.module"`` or ``"package.module:Class"``)."""
        module, _, qualname = self.owner.partition(":")
        obj = importlib.import_module(module)
        for attr in qualname.split(".") if qualname else ():
            obj = getattr(obj, attr)
        return obj

    def problem(self) -> str | None:
        """What is wrong with this seam in the installed library (None: it is as expected)."""
        try:
            owner = self.owner_object()
        except (ImportError, AttributeError):
            return f"{self.owner} is gone"
        if self.set_in is not None:
            method = getattr(owner, self.set_in, None)
            try:
                source = inspect.getsource(method)
            except (OSError, TypeError):
                return f"cannot be looked for: the source of {self.set_in} cannot be read"
            assigned = rf"\b{re.escape(self.target)}\.{re.escape(self.name)}\s*(:[^=\n]*)?=(?!=)"
            return None if re.search(assigned, source) else f"is not set in {self.set_in}"
        if self.name not in vars(owner):  # the owner's own, not inherited (e.g. a Callback's no-op)
            return "is gone"
        value = vars(owner)[self.name]
        if self.params is not None:
            try:
                got = tuple(inspect.signature(value).parameters)
            except (TypeError, ValueError):
                return "is no longer a function"
            if got != self.params:
                return f"takes ({', '.join(got)}), not ({', '.join(self.params)})"
        if self.probe is not None and not self.probe(value):
            return "behaves differently"
        return None


def check_seams(seams: list[Seam], where: str) -> None:
    """Raise one ``SeamError`` naming every seam of ``seams`` that is missing or changed."""
    broken = [(s, p) for s in seams if (p := s.problem()) is not None]
    if not broken:
        return
    found = "; ".join(f"{s.library} {s.label} {p} ({s.why})" for s, p in broken)
    versions = ", ".join(
        f"{lib} {WRITTEN_FOR[lib][1]} (installed: {installed_version(lib)})"
        for lib in sorted({s.library for s, _ in broken})
    )
    raise SeamError(
        f"{where}: the installed libraries changed names this project relies on: {found}. Written for "
        f"{versions}: install those versions (pyproject.toml) or port {where} and its users"
    )


def installed_version(library: str) -> str:
    """The installed version of ``library`` (a key of ``WRITTEN_FOR``), or "none"."""
    try:
        return importlib.metadata.version(WRITTEN_FOR[library][0])
    except importlib.metadata.PackageNotFoundError:
        return "none"
