"""Buffer-centric baselines, exact and tested, sharing the collective layer and expert math."""

from moe_relayfree.baselines import capacity, ragged

__all__ = ["capacity", "ragged"]
