"""Two verbs, DeepEP-style: ``dispatch`` returns what the experts need plus a handle carrying
the plan; ``combine`` takes the experts' output and the handle. Call inside ``shard_map``.

The prefill variant here is single-shot: its receive buffer has the worst-case ``P*T*k`` rows,
so one round is always enough. For a bounded buffer with extra rounds on skewed batches, use
:func:`moe_relayfree.prefill.prefill_moe` with your expert function.
"""

from __future__ import annotations

from typing import Literal, Union

import jax
from jax import lax

from moe_relayfree import decode, prefill
from moe_relayfree.paths import PATHS, Call
from moe_relayfree.windows import ExpertWindows

Handle = Union[prefill.PrefillHandle, decode.GatherHandle]
#: the schedules the verbs take: the relay-free entries of the table of paths
SCHEDULES = tuple(name for name, p in PATHS.items() if p.implementation == "relayfree")


def dispatch(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    schedule: Literal["prefill", "decode"] = "prefill",
    transport: decode.Transport = "auto",
) -> tuple[ExpertWindows, Handle]:
    """x ``[T, d]``, topk_ids ``[T, k] int32``, topk_weights ``[T, k]``.

    Returns expert-major :class:`ExpertWindows` (rows ``[R, d]`` + group sizes ``[El]``) and
    the handle. Prefill: ``R = P*T*k``; decode: ``R = P*T*min(k, El)``, with ``transport``
    chosen as in :func:`moe_relayfree.decode.choose_transport`; ``transport="replicated"``
    (x the same ``N`` tokens on every rank): ``R = N*min(k, El)`` and combine returns all
    ``N`` results on every rank. (The ``dispatch`` of :data:`moe_relayfree.paths.PATHS`'s
    ``schedule`` entry, with a worst-case receive buffer.)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    worst = lax.axis_size(axis_name) * topk_ids.size
    call = Call(num_experts=num_experts, axis_name=axis_name, rows=worst, transport=transport)
    return PATHS[schedule].dispatch(x, topk_ids, topk_weights, call)


def combine(expert_out: jax.Array, handle: Handle) -> jax.Array:
    """expert_out ``[R, d]``: one unweighted result per window row. Returns ``[T, d]``."""
    schedule = "decode" if isinstance(handle, decode.GatherHandle) else "prefill"
    return PATHS[schedule].combine(expert_out, handle)
