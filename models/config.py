"""Model configuration for the MoE decoder family, and its mapping from Hugging Face configs."""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_relayfree.routing import RouterConfig

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer. ``moe_layers[i]`` says whether layer i is MoE."""

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int  # dense MLP size (dense layers)
    num_experts: int
    k: int
    d_ff_expert: int
    moe_layers: tuple[bool, ...]
    router: RouterConfig = RouterConfig()
    shared_d_ff: int = 0
    shared_gate: bool = False
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    tie_embeddings: bool = False
    # MLA (DeepSeek-V3); used when arch == "deepseek_v3"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    max_position: int = 4096
    # Sliding-window attention: ``sliding_window`` keys for the layers where
    # ``sliding_layers[i]`` is True (all layers when ``sliding_layers`` is None); None: off.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip_qkv, clip_qkv]

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; known: {ARCHITECTURES}")
        if len(self.moe_layers) != self.n_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be none|head|full, got {self.qk_norm!r}")

    def attention_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is not None and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @property
    def is_mla(self) -> bool:
        return self.arch == "deepseek_v3"


def _get(cfg: dict, key: str, default: Any = None, required: bool = False):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ValueError(f"config.json is missing {key!r}")
    return default


def _num_experts(cfg: dict) -> int:
    """``num_experts`` (transformers 4 Qwen/OLMoE) or ``num_local_experts`` (Mixtral, v5)."""
    value = _get(cfg, "num_experts", _get(cfg, "num_local_experts"))
    if value is None:
        raise ValueError("config.json has neither 'num_experts' nor 'num_local_experts'")
    return int(value)


def _rope_theta(cfg: dict) -> float:
    """RoPE base from ``rope_theta`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    params = _get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"rope_type {kind!r} is not supported yet (only default RoPE)")
    return float(_get(cfg, "rope_theta") or params.get("rope_theta") or 10000.0)


def from_hf_config(cfg: dict) -> ModelConfig:
    """Maps a Hugging Face ``config.json`` (as a dict) to :class:`ModelConfig`."""
    model_type = _get(cfg, "model_type", required=True)
    n_layers = _get(cfg, "num_hidden_layers", required=True)
    n_heads = _get(cfg, "num_attention_heads", required=True)
    d_model = _get(cfg, "hidden_size", required=True)
    common = dict(
        vocab_size=_get(cfg, "vocab_size", required=True),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_get(cfg, "num_key_value_heads", n_heads),
        head_dim=_get(cfg, "head_dim", d_model // n_heads),
        d_ff=_get(cfg, "intermediate_size", 0),
        rope_theta=_rope_theta(cfg),
        rms_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)),
        max_position=int(_get(cfg, "max_position_embeddings", 4096)),
    )
    if model_type in ("qwen3_moe", "qwen2_moe"):
        step = _get(cfg, "decoder_sparse_step", 1)
        dense = set(_get(cfg, "mlp_only_layers", []))
        num_experts = _num_experts(cfg)
        moe = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
        extra = dict(
            arch=model_type, num_experts=num_experts, k=_get(cfg, "num_experts_per_tok", required=True),
            d_ff_expert=_get(cfg, "moe_intermediate_size", required=True), moe_layers=moe,
            router=RouterConfig(renormalize=bool(_get(cfg, "norm_topk_prob", model_type == "qwen3_moe"))),
        )
        if model_type == "qwen3_moe":
            extra.update(qk_norm="head", qkv_bias=bool(_get(cfg, "attention_bias", False)))
        else:
            extra.update(qkv_bias=True, shared_d_ff=_get(cfg, "shared_expert_intermediate_size", 0),
                         shared_gate=True)
        return ModelConfig(**common, **extra)
    if model_type == "mixtral":
        return ModelConfig(
            **common, arch="mixtral", num_experts=_num_experts(cfg),
            k=_get(cfg, "num_experts_per_tok", required=True),
            d_ff_expert=_get(cfg, "intermediate_size", required=True),
            moe_layers=(True,) * n_layers, router=RouterConfig(renormalize=True),
        )
    if model_type == "olmoe":
        return ModelConfig(
            **common, arch="olmoe", num_experts=_num_experts(cfg),
            k=_get(cfg, "num_experts_per_tok", required=True),
            d_ff_expert=_get(cfg, "intermediate_size", required=True),
            moe_layers=(True,) * n_layers, qk_norm="full",
            router=RouterConfig(renormalize=bool(_get(cfg, "norm_topk_prob", False))),
        )
    if model_type == "deepseek_v3":
        first_dense = _get(cfg, "first_k_dense_replace", 0)
        freq = _get(cfg, "moe_layer_freq", 1)
        moe = tuple(i >= first_dense and i % freq == 0 for i in range(n_layers))
        if not _get(cfg, "n_routed_experts") and _get(cfg, "num_local_experts"):
            cfg = dict(cfg, n_routed_experts=cfg["num_local_experts"])
        d_ff_expert = _get(cfg, "moe_intermediate_size", required=True)
        return ModelConfig(
            **dict(common, head_dim=_get(cfg, "qk_nope_head_dim", 0) + _get(cfg, "qk_rope_head_dim", 0)),
            arch="deepseek_v3", num_experts=_get(cfg, "n_routed_experts", required=True),
            k=_get(cfg, "num_experts_per_tok", required=True), d_ff_expert=d_ff_expert,
            moe_layers=moe, shared_d_ff=_get(cfg, "n_shared_experts", 0) * d_ff_expert,
            router=RouterConfig(
                method="sigmoid_grouped", renormalize=bool(_get(cfg, "norm_topk_prob", True)),
                n_group=_get(cfg, "n_group", 1), topk_group=_get(cfg, "topk_group", 1),
                routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)), score_bias=True,
            ),
            q_lora_rank=_get(cfg, "q_lora_rank"), kv_lora_rank=_get(cfg, "kv_lora_rank", required=True),
            qk_nope_head_dim=_get(cfg, "qk_nope_head_dim", required=True),
            qk_rope_head_dim=_get(cfg, "qk_rope_head_dim", required=True),
            v_head_dim=_get(cfg, "v_head_dim", required=True),
            rope_interleave=bool(_get(cfg, "rope_interleave", True)),
        )
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {ARCHITECTURES}")


def to_hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict for ``cfg``."""
    out = dict(
        model_type=cfg.arch, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position, num_experts_per_tok=cfg.k,
        hidden_act="silu",
    )
    if cfg.arch in ("qwen3_moe", "qwen2_moe"):
        out.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.d_ff_expert,
                   intermediate_size=cfg.d_ff, decoder_sparse_step=1,
                   mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m],
                   norm_topk_prob=cfg.router.renormalize)
        if cfg.arch == "qwen2_moe":
            out.update(shared_expert_intermediate_size=cfg.shared_d_ff, qkv_bias=True)
        else:
            out.update(attention_bias=cfg.qkv_bias)
    elif cfg.arch == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.d_ff_expert)
    elif cfg.arch == "deepseek_v3":
        first = cfg.moe_layers.index(True) if any(cfg.moe_layers) else cfg.n_layers
        if cfg.moe_layers != tuple(i >= first for i in range(cfg.n_layers)):
            raise ValueError("deepseek_v3 configs need dense layers first, then MoE layers")
        if cfg.shared_d_ff % cfg.d_ff_expert:
            raise ValueError("deepseek_v3 shared_d_ff must be a multiple of d_ff_expert")
        r = cfg.router
        out.update(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.d_ff_expert,
                   n_shared_experts=cfg.shared_d_ff // cfg.d_ff_expert, intermediate_size=cfg.d_ff,
                   first_k_dense_replace=first, moe_layer_freq=1, n_group=r.n_group,
                   topk_group=r.topk_group, routed_scaling_factor=r.routed_scaling_factor,
                   norm_topk_prob=r.renormalize, q_lora_rank=cfg.q_lora_rank,
                   kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                   head_dim=cfg.qk_rope_head_dim, rope_interleave=cfg.rope_interleave)
    elif cfg.arch == "olmoe":
        out.update(num_experts=cfg.num_experts, intermediate_size=cfg.d_ff_expert,
                   norm_topk_prob=cfg.router.renormalize)
    return out
