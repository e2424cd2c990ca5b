"""Hugging Face ``config.json`` <-> :class:`ModelConfig`, with transformers' own defaults.

A key missing from ``config.json`` takes the default of the transformers config class of the
version the parity fixtures were made with (``models/hf_defaults.py``, generated), followed by
the derivations that class's ``__post_init__`` makes (e.g. Qwen3-MoE's ``sliding_window`` is
None unless ``use_sliding_window``). Every key of those classes is either read here (and a value
this project cannot run is refused with an error naming the key) or listed in ``HARMLESS``
(training-only, generation or bookkeeping fields that do not change a forward pass); a test
walks the classes' keys to keep it so. Keys the class does not know are ignored, as
transformers ignores them, except those in ``FOREIGN`` whose values change the math.
"""

from __future__ import annotations

import warnings
from typing import Any

from moe_relayfree_models.config import ARCHITECTURES, ModelConfig, RopeScaling
from moe_relayfree_models.hf_defaults import ALIASES, DEFAULTS, ROPE_THETA
from moe_relayfree_models.quant import parse_quantization
from moe_relayfree.routing import RouterConfig

# Keys that do not change inference math: bookkeeping, generation settings, and training-only
# terms (dropout, router aux loss, jitter noise, init range). Same for every family.
HARMLESS = frozenset({
    "_name_or_path", "architectures", "attention_dropout", "auto_map", "bos_token_id",
    "chunk_size_feed_forward", "dtype", "eos_token_id", "id2label", "initializer_range",
    "is_encoder_decoder", "label2id", "output_attentions", "output_hidden_states",
    "output_router_logits", "pad_token_id", "problem_type", "return_dict",
    "router_aux_loss_coef", "router_jitter_noise", "torch_dtype", "transformers_version",
    "use_cache",
    # DeepSeek-V3: tensor-parallel slicing of the original training code; the multi-token-
    # prediction layers, which transformers does not build either (next-token logits only).
    "pretraining_tp", "num_nextn_predict_layers",
    # DeepSeek-V3's released config.json: its training aux-loss terms and the original code's
    # expert-parallel size (a deployment setting; the mesh here says it)
    "aux_loss_alpha", "seq_aux", "ep_size",
})

# Keys outside the transformers classes that checkpoints carry and that change the math:
# key -> (family or None for all, the value this project runs).
FOREIGN = {
    "moe_layer_freq": ("deepseek_v3", 1),
    "scoring_func": ("deepseek_v3", "sigmoid"),
    "topk_method": ("deepseek_v3", "noaux_tc"),
}


class _Keys:
    """``config.json`` over the family's defaults; records which keys were read."""

    def __init__(self, cfg: dict, model_type: str):
        self.model_type = model_type
        raw = dict(cfg)
        for alias, name in ALIASES[model_type].items():
            if alias in raw:
                value = raw.pop(alias)
                raw.setdefault(name, value)
        if "torch_dtype" in raw:  # transformers 4 name
            raw.setdefault("dtype", raw.pop("torch_dtype"))
        self.given = raw
        self.values = {**DEFAULTS[model_type], **raw}
        self.read: set[str] = {"model_type"}

    def __call__(self, key: str, fallback: Any = None) -> Any:
        """The value (transformers' default when absent); ``fallback`` replaces a None."""
        self.read.add(key)
        value = self.values.get(key)
        return fallback if value is None else value

    def require(self, key: str, allowed, why: str) -> Any:
        """Reads ``key`` and refuses any value not in ``allowed``."""
        value = self(key)
        if value not in allowed:
            raise ValueError(f"config.json {key}={value!r} is not supported: {why}")
        return value

    def check_unread(self) -> None:
        family = DEFAULTS[self.model_type]
        for key, (only, runs) in FOREIGN.items():
            if key in self.given and (only is None or only == self.model_type):
                if self.given[key] != runs:
                    what = f"{key}={self.given[key]!r}"
                    raise ValueError(f"config.json {key}: {what} not supported "
                                     f"(this loader runs {key}={runs!r})")
        missed = sorted(k for k in family if k not in self.read and k not in HARMLESS)
        if missed:  # a transformers key nobody decided about: a bug here, caught by the tests
            raise ValueError(f"internal: config keys {missed} of {self.model_type} are neither read nor harmless")
        unknown = sorted(k for k in self.given if k not in family and k not in HARMLESS
                         and k not in FOREIGN and k not in self.read)
        if unknown:
            warnings.warn(f"config.json keys unknown to transformers' {self.model_type} config are "
                          f"ignored, as transformers ignores them: {unknown}", stacklevel=3)


# rope_parameters keys each rope_type reads (transformers' modeling_rope_utils); others refused
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"},
}


def _rope(get: _Keys) -> tuple[float, RopeScaling | None]:
    """(RoPE base, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` (transformers 4): the default RoPE, "linear", "yarn" (DeepSeek-V3,
    long-context Qwen3) and "llama3"; other types are refused with their name."""
    params = dict(get("rope_parameters") or get("rope_scaling") or {})
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(get("rope_theta") or params.pop("rope_theta", None) or ROPE_THETA[get.model_type])
    params.pop("rope_theta", None)
    if kind not in _ROPE_KEYS:
        raise ValueError(f"config.json rope_type {kind!r} is not supported (supported: "
                         f"{', '.join(_ROPE_KEYS)}; 'dynamic' rescales with the sequence length "
                         f"at run time)")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    unknown = sorted(set(params) - _ROPE_KEYS[kind])
    if unknown:
        raise ValueError(f"config.json rope parameters {unknown} are not read by rope_type "
                         f"{kind!r} here; refusing rather than ignoring them")
    if kind == "default":
        return theta, None
    original = get("original_max_position_embeddings")  # Phi-3 style, takes priority
    original = original or params.get("original_max_position_embeddings") or \
        get("max_position_embeddings")
    return theta, RopeScaling(
        kind=kind, factor=None if params.get("factor") is None else float(params["factor"]),
        original_max_position=int(original) if kind in ("yarn", "llama3") else None,
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"), truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)))


def _common(get: _Keys) -> dict:
    get.require("hidden_act", ("silu",), "the experts and MLPs are SwiGLU (silu)")
    n_heads = get("num_attention_heads")
    d_model = get("hidden_size")
    rope_theta, rope_scaling = _rope(get)
    return dict(
        vocab_size=get("vocab_size"), d_model=d_model, n_layers=get("num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=get("num_key_value_heads", n_heads),
        head_dim=get("head_dim", d_model // n_heads), d_ff=get("intermediate_size", 0),
        rope_theta=rope_theta, rope_scaling=rope_scaling, rms_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(get("tie_word_embeddings")),
        max_position=int(get("max_position_embeddings")),
    )


def _qwen(get: _Keys, common: dict) -> ModelConfig:
    arch, n_layers = get.model_type, common["n_layers"]
    step = get("decoder_sparse_step")
    dense = set(get("mlp_only_layers", []))
    num_experts = get("num_local_experts" if arch == "qwen3_moe" else "num_experts")
    moe = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
    extra = dict(
        arch=arch, num_experts=num_experts, k=get("num_experts_per_tok"),
        d_ff_expert=get("moe_intermediate_size"), moe_layers=moe,
        router=RouterConfig(renormalize=bool(get("norm_topk_prob"))),
    )
    use_window = bool(get("use_sliding_window"))
    configured = get("sliding_window")
    window = configured if use_window else None  # as the config classes derive it
    if use_window and not window:
        raise ValueError("config.json use_sliding_window is set but sliding_window is not")
    if arch == "qwen3_moe":
        bias = bool(get("attention_bias"))  # q, k, v and o projections
        extra.update(qk_norm="head", qkv_bias=bias, o_bias=bias, sliding_window=window)
    else:
        types = get("layer_types")
        if types is None:  # Qwen2MoeConfig.__post_init__
            limit = get("max_window_layers")
            types = ["sliding_attention" if (i + 1) % 2 and i < limit and use_window
                     else "full_attention" for i in range(n_layers)]
        else:
            get("max_window_layers")  # layer_types, when given, decides alone
        if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"config.json layer_types must list full_attention/sliding_attention "
                             f"for each of the {n_layers} layers, got {types}")
        sliding = tuple(t == "sliding_attention" for t in types)
        if any(sliding) and not window:
            raise ValueError("config.json layer_types has sliding_attention layers but no sliding_window")
        extra.update(qkv_bias=bool(get("qkv_bias")), shared_d_ff=get("shared_expert_intermediate_size"),
                     shared_gate=True, sliding_window=window if any(sliding) else None,
                     sliding_layers=sliding if any(sliding) else None)
    return ModelConfig(**common, **extra)


def _mixtral(get: _Keys, common: dict) -> ModelConfig:
    return ModelConfig(
        **common, arch="mixtral", num_experts=get("num_local_experts"), k=get("num_experts_per_tok"),
        d_ff_expert=common["d_ff"], moe_layers=(True,) * common["n_layers"],
        router=RouterConfig(renormalize=True), sliding_window=get("sliding_window"),
    )


def _olmoe(get: _Keys, common: dict) -> ModelConfig:
    bias = bool(get("attention_bias"))
    clip = get("clip_qkv")
    return ModelConfig(
        **common, arch="olmoe", num_experts=get("num_experts"), k=get("num_experts_per_tok"),
        d_ff_expert=common["d_ff"], moe_layers=(True,) * common["n_layers"], qk_norm="full",
        router=RouterConfig(renormalize=bool(get("norm_topk_prob"))), qkv_bias=bias, o_bias=bias,
        clip_qkv=None if clip is None else float(clip),
    )


def _deepseek_v3(get: _Keys, common: dict) -> ModelConfig:
    get.require("attention_bias", (False,), "MLA projections without bias only")
    first_dense = get("first_k_dense_replace")
    d_ff_expert = get("moe_intermediate_size")
    rope = get("qk_rope_head_dim")
    nope = get("qk_nope_head_dim")
    get("head_dim")  # transformers derives it (= qk_rope_head_dim); unused by MLA here
    if get("qk_head_dim", nope + rope) != nope + rope:  # derived too; a saved one must agree
        raise ValueError(f"config.json qk_head_dim={get('qk_head_dim')} is not "
                         f"qk_nope_head_dim + qk_rope_head_dim = {nope + rope}")
    return ModelConfig(
        **dict(common, head_dim=nope + rope),
        arch="deepseek_v3", num_experts=get("n_routed_experts"), k=get("num_experts_per_tok"),
        d_ff_expert=d_ff_expert, moe_layers=tuple(i >= first_dense for i in range(common["n_layers"])),
        shared_d_ff=get("n_shared_experts") * d_ff_expert,
        router=RouterConfig(
            method="sigmoid_grouped", renormalize=bool(get("norm_topk_prob")),
            n_group=get("n_group"), topk_group=get("topk_group"),
            routed_scaling_factor=float(get("routed_scaling_factor")), score_bias=True,
        ),
        q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=get("v_head_dim"), rope_interleave=bool(get("rope_interleave")),
    )


_FAMILIES = {"qwen3_moe": _qwen, "qwen2_moe": _qwen, "mixtral": _mixtral, "olmoe": _olmoe,
             "deepseek_v3": _deepseek_v3}


def from_hf_config(cfg: dict) -> ModelConfig:
    """Maps a Hugging Face ``config.json`` (as a dict) to :class:`ModelConfig`."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ValueError("config.json is missing 'model_type'")
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {ARCHITECTURES}")
    get = _Keys(cfg, model_type)
    out = _FAMILIES[model_type](get, _common(get))
    # weights only: models.quant reads them dequantized; the math is the unquantized model's
    parse_quantization(get.given.get("quantization_config"))
    get.read.add("quantization_config")
    get.check_unread()
    return out


def _rope_parameters(cfg: ModelConfig) -> dict:
    """``rope_parameters`` as transformers 5 writes it."""
    rs = cfg.rope_scaling
    out = {"rope_type": "default" if rs is None else rs.kind, "rope_theta": cfg.rope_theta}
    if rs is None:
        return out
    fields = {"factor": rs.factor, "original_max_position_embeddings": rs.original_max_position}
    if rs.kind == "yarn":
        fields.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, mscale=rs.mscale,
                      mscale_all_dim=rs.mscale_all_dim, attention_factor=rs.attention_factor,
                      truncate=rs.truncate)
    elif rs.kind == "llama3":
        fields.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    else:
        fields.pop("original_max_position_embeddings")
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


def to_hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict for ``cfg`` (keys as transformers writes them)."""
    if cfg.qkv_bias != cfg.o_bias and cfg.arch in ("qwen3_moe", "olmoe"):
        raise ValueError(f"{cfg.arch} has one attention_bias for q, k, v and o")
    out = dict(
        model_type=cfg.arch, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        rope_parameters=_rope_parameters(cfg),
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position, num_experts_per_tok=cfg.k,
        hidden_act="silu",
    )
    if cfg.arch in ("qwen3_moe", "qwen2_moe"):
        out.update(moe_intermediate_size=cfg.d_ff_expert, intermediate_size=cfg.d_ff,
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m],
                   norm_topk_prob=cfg.router.renormalize,
                   use_sliding_window=cfg.sliding_window is not None)
        if cfg.sliding_window is not None:
            out["sliding_window"] = cfg.sliding_window
        if cfg.arch == "qwen2_moe":
            out.update(num_experts=cfg.num_experts, shared_expert_intermediate_size=cfg.shared_d_ff,
                       qkv_bias=cfg.qkv_bias)
            if cfg.sliding_window is not None:
                layers = cfg.sliding_layers or (True,) * cfg.n_layers
                out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in layers]
        else:
            if cfg.sliding_layers is not None and not all(cfg.sliding_layers):
                raise ValueError("qwen3_moe applies its sliding window to every layer")
            out.update(num_local_experts=cfg.num_experts, attention_bias=cfg.qkv_bias)
    elif cfg.arch == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.d_ff_expert,
                   sliding_window=cfg.sliding_window)
    elif cfg.arch == "deepseek_v3":
        first = cfg.moe_layers.index(True) if any(cfg.moe_layers) else cfg.n_layers
        if cfg.moe_layers != tuple(i >= first for i in range(cfg.n_layers)):
            raise ValueError("deepseek_v3 configs need dense layers first, then MoE layers")
        if cfg.shared_d_ff % cfg.d_ff_expert:
            raise ValueError("deepseek_v3 shared_d_ff must be a multiple of d_ff_expert")
        r = cfg.router
        out.update(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.d_ff_expert,
                   n_shared_experts=cfg.shared_d_ff // cfg.d_ff_expert, intermediate_size=cfg.d_ff,
                   first_k_dense_replace=first, n_group=r.n_group,
                   topk_group=r.topk_group, routed_scaling_factor=r.routed_scaling_factor,
                   norm_topk_prob=r.renormalize, q_lora_rank=cfg.q_lora_rank,
                   kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                   head_dim=cfg.qk_rope_head_dim, rope_interleave=cfg.rope_interleave)
    elif cfg.arch == "olmoe":
        out.update(num_experts=cfg.num_experts, intermediate_size=cfg.d_ff_expert,
                   norm_topk_prob=cfg.router.renormalize, attention_bias=cfg.qkv_bias,
                   clip_qkv=cfg.clip_qkv)
    return out
