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

Handle = Union[prefill.PrefillHandle, decode.DecodeHandle]


def dispatch(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    schedule: Literal["prefill", "decode"] = "prefill",
) -> tuple[prefill.ExpertWindows | decode.DecodeSlots, Handle]:
    """x ``[T, d]``, topk_ids ``[T, k] int32``, topk_weights ``[T, k]``.

    Returns ``(ExpertWindows, PrefillHandle)`` for prefill (expert-major windows
    ``[P*T*k, d]`` + group sizes ``[El]``), or ``(DecodeSlots, DecodeHandle)`` for decode
    (slots ``[P*T, d]`` + local-expert weights ``[P*T, El]``).
    """
    if schedule == "decode":
        return decode.dispatch(
            x, topk_ids, topk_weights, num_experts=num_experts, axis_name=axis_name
        )
    if schedule != "prefill":
        raise ValueError(f"schedule must be 'prefill' or 'decode', got {schedule!r}")
    worst = lax.axis_size(axis_name) * topk_ids.size
    handle = prefill.plan_and_pack(
        x, topk_ids, topk_weights, num_experts=num_experts, axis_name=axis_name,
        rows_per_round=worst,
    )
    return prefill.dispatch_round(handle, 0), handle


def combine(expert_out: jax.Array, handle: Handle) -> jax.Array:
    """Prefill: expert_out ``[P*T*k, d]`` per window row (unweighted); decode: ``[P*T, d]``
    partial sums already weighted with the slots' table. Returns ``[T, d]``."""
    if isinstance(handle, decode.DecodeHandle):
        return decode.combine(expert_out, handle)
    return prefill.weighted_sum(prefill.combine_round(handle, expert_out, 0))
