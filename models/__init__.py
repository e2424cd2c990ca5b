"""MoE transformer models built on moe_relayfree."""

from models.config import ARCHITECTURES, ModelConfig, from_hf_config
from models.transformer import KVCache, MoETransformer, init_cache

__all__ = ["ARCHITECTURES", "KVCache", "ModelConfig", "MoETransformer", "from_hf_config", "init_cache"]
