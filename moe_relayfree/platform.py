"""Platforms: registering a PJRT plugin (e.g. Ascend) and the per-platform capability registry.

One traced program serves every platform: the ragged all-to-all and the grouped GEMM are picked
at lowering time (``jax.lax.platform_dependent``) from two registries, ``collectives`` and
``experts``. Platforms not listed use XLA's native ``ragged_all_to_all`` and ``ragged_dot``.
"""

from __future__ import annotations

import ctypes
import os
import warnings

from moe_relayfree import collectives, experts

ENV_VAR = "MOE_RELAYFREE_PJRT_PLUGIN"


class PluginError(RuntimeError):
    pass


def validate_plugin_library(path: str | None) -> str:
    """Checks that ``path`` is a loadable shared library exporting ``GetPjrtApi``."""
    if not path:
        raise PluginError(f"no PJRT plugin library given: pass library_path or set {ENV_VAR}")
    if not os.path.isfile(path):
        raise PluginError(f"PJRT plugin library {path} does not exist")
    try:
        lib = ctypes.CDLL(os.path.abspath(path))
    except OSError as e:
        raise PluginError(f"{path} is not a loadable shared library ({e})") from None
    if not hasattr(lib, "GetPjrtApi"):
        raise PluginError(f"{path} is not a PJRT plugin: it exports no GetPjrtApi symbol")
    return os.path.abspath(path)


def _backends_initialized() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def register_pjrt_plugin(
    library_path: str | None = None,
    *,
    name: str = "ascend",
    options: dict | None = None,
    priority: int = 400,
    fallback_to_cpu: bool = False,
) -> str | None:
    """Registers a PJRT plugin with JAX; call before JAX creates its backends.

    The library comes from ``library_path`` or the ``MOE_RELAYFREE_PJRT_PLUGIN`` environment
    variable. Returns the platform name, or ``None`` when ``fallback_to_cpu`` turned a failure
    into a warning (JAX then runs on CPU with the emulated ragged all-to-all).
    """
    try:
        path = validate_plugin_library(library_path or os.environ.get(ENV_VAR))
        if _backends_initialized():
            raise PluginError(
                "JAX backends are already initialised: register the plugin before the first "
                "jax.devices() call or computation"
            )
        from jax._src import xla_bridge

        xla_bridge.register_plugin(name, priority=priority, library_path=path, options=options)
        return name
    except PluginError as e:
        if not fallback_to_cpu:
            raise
        warnings.warn(f"{e}; falling back to CPU with the emulated ragged all-to-all", stacklevel=2)
        if not _backends_initialized():
            os.environ["JAX_PLATFORMS"] = "cpu"
        return None


def set_platform_impls(platform: str, *, ragged_all_to_all=None, grouped_swiglu=None,
                       grouped_swiglu_takes_expected_rows: bool = False) -> None:
    """Plugs a vendor implementation in for ``platform`` (the name JAX lowers for, e.g. the
    plugin's platform name). Signatures: see ``collectives.RaggedAllToAll`` and
    ``experts.grouped_swiglu``; ``grouped_swiglu_takes_expected_rows``: the kernel also accepts
    the keyword ``expected_rows`` (the rows the windows usually hold, to size its tiles)."""
    if ragged_all_to_all is not None:
        collectives.register_ragged_all_to_all(platform, ragged_all_to_all)
    if grouped_swiglu is not None:
        experts.register_grouped_swiglu(platform, grouped_swiglu,
                                        takes_expected_rows=grouped_swiglu_takes_expected_rows)


def capabilities() -> dict[str, dict[str, str]]:
    """Which implementation each platform lowers to; ``default`` covers unlisted platforms."""
    a2a, gemm = collectives.ragged_all_to_all_impls(), experts.grouped_swiglu_impls()
    table = {p: {"ragged_all_to_all": getattr(a2a.get(p), "__name__", "native"),
                 "grouped_swiglu": getattr(gemm.get(p), "__name__", "native ragged_dot")}
             for p in sorted(set(a2a) | set(gemm))}
    table["default"] = {"ragged_all_to_all": "native", "grouped_swiglu": "native ragged_dot"}
    return table
