"""moe-relayfree: relay-buffer-free expert-parallel MoE dispatch/combine for JAX."""

from moe_relayfree import (
    balance,
    collectives,
    decode,
    distributed,
    layout,
    plan,
    platform,
    prefill,
    routing,
    transports,
)
from moe_relayfree.api import expert_parallel_moe, replicates_tokens, route_tokens
from moe_relayfree.config import DEFAULT_CAPACITY_FACTOR, DispatchConfig, dispatch_config
from moe_relayfree.layout import MeshLayout, make_ep_mesh, make_layout, make_mesh, parse_mesh
from moe_relayfree.selection import (
    DEFAULT_DECODE_THRESHOLDS,
    calibrate_decode_threshold,
    decode_threshold,
    select_schedule,
    set_decode_threshold,
)
from moe_relayfree.collectives import ragged_all_to_all, register_ragged_all_to_all
from moe_relayfree.experts import grouped_swiglu, swiglu, windows_swiglu
from moe_relayfree.layer import MoELayer
from moe_relayfree.reference import dense_moe_reference
from moe_relayfree.routing import RouterConfig, route
from moe_relayfree.verbs import combine, dispatch

__all__ = [
    "DEFAULT_CAPACITY_FACTOR",
    "DEFAULT_DECODE_THRESHOLDS",
    "DispatchConfig",
    "dispatch_config",
    "MeshLayout",
    "MoELayer",
    "RouterConfig",
    "balance",
    "calibrate_decode_threshold",
    "collectives",
    "combine",
    "decode",
    "decode_threshold",
    "distributed",
    "dense_moe_reference",
    "dispatch",
    "expert_parallel_moe",
    "layout",
    "make_ep_mesh",
    "make_layout",
    "make_mesh",
    "parse_mesh",
    "grouped_swiglu",
    "plan",
    "platform",
    "prefill",
    "ragged_all_to_all",
    "register_ragged_all_to_all",
    "replicates_tokens",
    "route",
    "route_tokens",
    "routing",
    "select_schedule",
    "set_decode_threshold",
    "swiglu",
    "windows_swiglu",
    "transports",
]
