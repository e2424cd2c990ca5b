"""moe-relayfree: relay-buffer-free expert-parallel MoE dispatch/combine for JAX.

The surface, by what it is for:

* the layer: :class:`MoELayer`, configured by :class:`DispatchConfig` (mesh, axis roles,
  schedule, :class:`Lowering`) and :class:`RouterConfig`;
* the dispatch paths (relay-free prefill and decode, the baselines): one table,
  :data:`moe_relayfree.paths.PATHS`; :func:`resolve` says which one a call runs;
* the functional core: :func:`expert_parallel_moe`, :func:`route_tokens`, and the verbs
  :func:`dispatch` / :func:`combine` for your own ``shard_map`` (the schedules' pieces in
  :mod:`moe_relayfree.prefill` and :mod:`moe_relayfree.decode`); expert math
  :func:`swiglu`, :func:`grouped_swiglu`, :func:`windows_swiglu` (FP8 expert weights:
  :mod:`moe_relayfree.quant`); the reference
  :func:`dense_moe_reference`; router statistics and losses in :mod:`moe_relayfree.balance`;
* meshes: :func:`make_ep_mesh`, :func:`make_mesh`, :func:`parse_mesh`, :func:`make_layout`;
* the schedule choice: :func:`select_schedule`, :func:`decode_threshold`,
  :func:`set_decode_threshold` (measuring it: :mod:`moe_relayfree.tools.calibration`);
* platforms: :func:`register_ragged_all_to_all`, :mod:`moe_relayfree.platform` (PJRT
  plugins, kernel registries), :mod:`moe_relayfree.distributed` (multi-process start-up).

Tooling the core never imports lives in :mod:`moe_relayfree.tools` (deviceless TPU compiles,
HLO analysis, the platform self-check, calibration).
"""

from moe_relayfree import balance, decode, distributed, paths, platform, prefill, quant
from moe_relayfree.api import expert_parallel_moe, route_tokens
from moe_relayfree.collectives import ragged_all_to_all, register_ragged_all_to_all
from moe_relayfree.config import DispatchConfig, Lowering
from moe_relayfree.experts import grouped_swiglu, windows_swiglu
from moe_relayfree.ffn import swiglu
from moe_relayfree.layer import MoELayer
from moe_relayfree.paths import resolve
from moe_relayfree.layout import MeshLayout, make_ep_mesh, make_layout, make_mesh, parse_mesh
from moe_relayfree.reference import dense_moe_reference
from moe_relayfree.routing import RouterConfig, route
from moe_relayfree.selection import (
    DEFAULT_DECODE_THRESHOLDS,
    decode_threshold,
    select_schedule,
    set_decode_threshold,
)
from moe_relayfree.verbs import combine, dispatch

__all__ = [
    # the layer and its configuration
    "MoELayer", "DispatchConfig", "Lowering", "RouterConfig",
    # the functional core
    "expert_parallel_moe", "route_tokens", "route", "dispatch", "combine", "swiglu",
    "grouped_swiglu", "windows_swiglu", "dense_moe_reference", "balance", "prefill", "decode",
    "quant", "paths", "resolve",
    # meshes
    "MeshLayout", "make_ep_mesh", "make_layout", "make_mesh", "parse_mesh",
    # the schedule choice
    "DEFAULT_DECODE_THRESHOLDS", "decode_threshold", "select_schedule", "set_decode_threshold",
    # platforms
    "ragged_all_to_all", "register_ragged_all_to_all", "platform", "distributed",
]
