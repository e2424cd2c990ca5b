"""MoE transformer models built on moe_relayfree."""

from moe_relayfree_models.config import ARCHITECTURES, ModelConfig
from moe_relayfree_models.hf_config import from_hf_config, to_hf_config
from moe_relayfree_models.transformer import KVCache, MoETransformer, init_cache

__all__ = ["ARCHITECTURES", "KVCache", "ModelConfig", "MoETransformer", "from_hf_config", "init_cache", "to_hf_config"]
