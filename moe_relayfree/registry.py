"""Per-platform kernel registries (ragged all-to-all, grouped SwiGLU) and their generation.

Implementations are chosen when a program is traced (``lax.platform_dependent`` over the
registered platforms), so a program compiled before a registration keeps the kernels it was
traced with. :func:`generation` counts registrations; every compiled-program cache of the
library keys on it, so a new registration takes effect at the next call.
"""

from __future__ import annotations

import itertools
from typing import Generic, TypeVar

Impl = TypeVar("Impl")

_counter = itertools.count(1)
_generation = 0


def generation() -> int:
    """Changes whenever any registry changes."""
    return _generation


class PlatformRegistry(Generic[Impl]):
    """platform name (as ``lax.platform_dependent`` spells it: "cpu", "cuda", "rocm", "tpu",
    a plugin's name) -> implementation; platforms not listed use the native XLA op."""

    def __init__(self, builtin: dict[str, Impl]):
        self._impls: dict[str, Impl] = dict(builtin)

    def set(self, platform: str, impl: Impl | None) -> None:
        """``impl`` for ``platform``; ``None`` removes it (the native op again)."""
        global _generation
        if impl is None:
            self._impls.pop(platform, None)
        else:
            self._impls[platform] = impl
        _generation = next(_counter)

    def impls(self) -> dict[str, Impl]:
        return dict(self._impls)
