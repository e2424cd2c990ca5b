"""The baselines a user would pick instead, exact and tested, sharing the collective layer and
expert math: buffer-centric all-to-all (MaxText's ragged, GShard's capacity) and all-gather EP
(tpu-inference's, sglang-jax's)."""

from moe_relayfree.baselines import allgather, capacity, ragged

__all__ = ["allgather", "capacity", "ragged"]
