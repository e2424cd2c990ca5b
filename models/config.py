"""Model configuration for the MoE decoder family (its Hugging Face mapping: ``models/hf_config.py``)."""

from __future__ import annotations

import dataclasses

from moe_relayfree.routing import RouterConfig

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")
MLA_FORMS = ("auto", "absorbed", "expanded")


ROPE_TYPES = ("default", "linear", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Hugging Face's ``rope_parameters`` / ``rope_scaling`` past the base RoPE (transformers'
    ``modeling_rope_utils``): ``kind`` "linear" (positions divided by ``factor``), "yarn"
    (NTK-by-parts interpolation between ``beta_fast`` and ``beta_slow`` rotations of the
    ``original_max_position`` context, cos/sin scaled by ``attention_factor``: DeepSeek-V3 and
    long-context Qwen3) or "llama3" (wavelengths past ``original_max_position /
    low_freq_factor`` divided by ``factor``, smoothed up to ``/ high_freq_factor``).
    ``factor`` None (yarn): ``max_position / original_max_position``."""

    kind: str
    factor: float | None = None
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.kind not in ROPE_TYPES[1:]:
            raise ValueError(f"rope kind must be one of {ROPE_TYPES[1:]}, got {self.kind!r}")
        if self.kind != "yarn" and self.factor is None:
            raise ValueError(f"{self.kind} RoPE needs a factor")
        if self.kind in ("yarn", "llama3") and self.original_max_position is None:
            raise ValueError(f"{self.kind} RoPE needs original_max_position_embeddings")


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
    rope_scaling: RopeScaling | None = None  # None: the default RoPE
    rms_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False  # bias on the attention output projection (Qwen3/OLMoE attention_bias)
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
    # Routed experts kept in FP8 on the devices, one float32 scale per (rows, cols) block of
    # each [d, f] / [f, d] matrix (moe_relayfree.MoELayer's expert_block); None: param dtype.
    expert_fp8_block: tuple[int, int] | None = None
    # How MLA attends (a lowering choice, same results): "absorbed" over the latent cache,
    # "expanded" keys and values, or "auto" (models/mla.py's absorbed(): fewer multiply-adds).
    mla_form: str = "auto"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; known: {ARCHITECTURES}")
        if len(self.moe_layers) != self.n_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be none|head|full, got {self.qk_norm!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")
        if self.mla_form not in MLA_FORMS:
            raise ValueError(f"mla_form must be one of {MLA_FORMS}, got {self.mla_form!r}")
        if self.is_mla and (self.sliding_window is not None or self.clip_qkv is not None
                            or self.qkv_bias or self.o_bias):
            raise ValueError("deepseek_v3 (MLA) has no sliding window, clip_qkv or attention bias")

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

