"""Builds tiny random Hugging Face MoE models and their reference outputs as test fixtures.

Needs torch and transformers, which the project itself never imports; run it from a separate
environment (CPU torch 2.13.0 is on this machine's local disk):

    python3 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy
    .venv-hf/bin/python scripts/make_hf_fixtures.py       # writes tests/fixtures/hf/ and models/hf_defaults.py
    .venv-hf/bin/python scripts/make_hf_fixtures.py --defaults   # only some parts: --defaults,
                                                       # --tokenizers, --models, --variants,
                                                       # --official (DeepSeek-V3's RoPE)
    .venv-hf/bin/python scripts/make_hf_fixtures.py qwen3_moe-yarn   # named variants only

Per architecture and init scale ("default": the architecture's own init, "large": std 0.3 and
random norm weights, so logits differ visibly between tokens), the folder holds the model as
``save_pretrained`` writes it (``config.json`` + ``model.safetensors``) and ``reference.npz``:
``input_ids [2, 12]``, ``logits [2, 12, V]`` (float32, one forward), ``prompt [1, 5]`` and
``greedy [1, 8]`` (``generate`` with ``do_sample=False``). ``VARIANTS`` add folders with the
attention options the base ones leave off (sliding windows, clip_qkv, attention biases).
``tokenizer/`` holds the byte-level tokenizer as a Hugging Face ``tokenizer.json`` and the ids it
produces for sample texts; ``tokenizers/`` tokenizer folders whose special-token handling
differs, with the ids transformers' ``AutoTokenizer`` gives. ``models/hf_defaults.py`` gets the
config classes' defaults.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")

COMMON = dict(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rope_theta=10000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts_per_tok=2)

ARCHS = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, moe_intermediate_size=24, intermediate_size=48,
                       mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_experts=8, moe_intermediate_size=24, intermediate_size=48,
                       shared_expert_intermediate_size=40, norm_topk_prob=False)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=8, intermediate_size=24)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_experts=8, intermediate_size=24, norm_topk_prob=False)),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1,
                         intermediate_size=48, first_k_dense_replace=1, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                         head_dim=4, num_key_value_heads=4)),
}


# Attention features the base fixtures leave at their defaults: name -> (arch, scale, overrides).
VARIANTS = {
    "mixtral-window": ("mixtral", "large", dict(sliding_window=4)),
    "qwen3_moe-window-bias": ("qwen3_moe", "large",
                              dict(use_sliding_window=True, sliding_window=5, attention_bias=True)),
    "qwen2_moe-window": ("qwen2_moe", "large",  # layer 0 sliding, layer 1 full
                         dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "olmoe-clip-bias": ("olmoe", "large", dict(clip_qkv=0.8, attention_bias=True)),
    # scaled RoPE, with positions past original_max_position_embeddings (the 12-token input,
    # 5 + 8 generated): YaRN as DeepSeek-V3 (with its softmax-scale correction, mscale and
    # mscale_all_dim different here so both terms count) and long-context Qwen3 use it;
    # linear and llama3 on two other families
    "deepseek_v3-yarn": ("deepseek_v3", "large", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
        beta_fast=32, beta_slow=1, mscale=0.8, mscale_all_dim=0.9))),
    "qwen3_moe-yarn": ("qwen3_moe", "large", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8))),
    "qwen2_moe-linear": ("qwen2_moe", "large", dict(rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mixtral-llama3": ("mixtral", "large", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8))),
}


def build(arch: str, scale: str, seed: int, **overrides):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kwargs = dict(COMMON, **extra, **overrides)
    if scale == "large":
        kwargs["initializer_range"] = 0.3
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    if scale == "large":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias
                    b.copy_(0.1 * torch.randn_like(b))
    return model


TOKENIZER_SAMPLES = ["def f(x):\n    return x + 1", "Return the number of items.",
                     "naïve café, ünïcödé ✓", "  leading spaces\tand tabs\n\n"]


def byte_level_tokenizer():
    """The project's byte-level scheme (ids 0-255 = bytes, 256 BOS, 257 EOS, 258 PAD) as a
    ``tokenizers.Tokenizer`` with no post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    return tok


def byte_tokenizer(folder: str) -> None:
    """The byte-level scheme as a Hugging Face ``tokenizer.json``, plus the ids it gives for a
    few texts."""
    tok = byte_level_tokenizer()
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    samples = [{"text": t, "ids": tok.encode(t).ids} for t in TOKENIZER_SAMPLES]
    with open(os.path.join(folder, "samples.json"), "w") as fh:
        json.dump(samples, fh, indent=1, ensure_ascii=False)


# PretrainedConfig fields that every config carries (bookkeeping, not model math).
_BASE_FIELDS = ("architectures", "chunk_size_feed_forward", "dtype", "id2label", "is_encoder_decoder",
                "label2id", "output_hidden_states", "problem_type", "return_dict",
                "transformers_version")


def config_defaults(path: str) -> None:
    """Writes ``models/hf_defaults.py``: per family, the defaults of transformers' config class
    fields (what a key missing from ``config.json`` becomes), its attribute aliases, and its
    default RoPE base."""
    import dataclasses
    import pprint

    tables, aliases, theta = {}, {}, {}
    for arch, (config_cls, _, _) in ARCHS.items():
        amap = dict(getattr(config_cls, "attribute_map", {}) or {})
        # Fields are stored under the attribute map's target name, as save_pretrained writes them.
        fields = {}
        for f in dataclasses.fields(config_cls):
            if f.name in _BASE_FIELDS:
                continue
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise SystemExit(f"{config_cls.__name__}.{f.name} has no default")
            fields[amap.get(f.name, f.name)] = value
        tables[arch] = fields
        aliases[arch] = amap
        theta[arch] = float(getattr(config_cls, "default_theta", 10000.0))
    text = (
        f'"""Defaults of the Hugging Face config classes (transformers {transformers.__version__}).\n\n'
        "Generated by ``scripts/make_hf_fixtures.py`` from the config classes' dataclass fields; do not\n"
        "edit by hand. ``DEFAULTS[model_type][key]`` is what transformers uses when ``config.json`` lacks\n"
        "``key`` (before each class's ``__post_init__`` derivations, which ``models/hf_config.py``\n"
        "repeats); ``ALIASES`` are the classes' attribute maps (alias -> stored name);\n"
        "``ROPE_THETA`` the RoPE base when ``config.json`` gives none.\n"
        '"""\n\n'
        f"TRANSFORMERS_VERSION = {transformers.__version__!r}\n\n"
        f"DEFAULTS = {pprint.pformat(tables, width=100, sort_dicts=True)}\n\n"
        f"ALIASES = {pprint.pformat(aliases, width=100, sort_dicts=True)}\n\n"
        f"ROPE_THETA = {pprint.pformat(theta, width=100, sort_dicts=True)}\n"
    )
    with open(path, "w") as fh:
        fh.write(text)


TOKENIZER_CASES = {
    # name: (post_processor, tokenizer_config.json): the post-processor decides in transformers
    # 5.23 even where tokenizer_config.json's add_bos_token says otherwise.
    "bytelevel-template-bos": ("bos", {"bos_token": "<bos>", "eos_token": "<eos>",
                                       "add_bos_token": False, "tokenizer_class": "LlamaTokenizerFast"}),
    "bytelevel-no-bos": ("bytelevel", {"bos_token": "<bos>", "eos_token": "<eos>",
                                       "add_bos_token": True, "tokenizer_class": "GPT2Tokenizer"}),
    "bytelevel-no-postprocessor": (None, {"bos_token": None, "eos_token": "<eos>",
                                          "tokenizer_class": "Qwen2Tokenizer"}),
    "metaspace-llama-bos": ("llama", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                      "add_bos_token": True, "tokenizer_class": "LlamaTokenizer"}),
}


def tokenizer_cases(folder: str) -> None:
    """Tokenizer folders whose special-token handling differs, with the ids transformers'
    AutoTokenizer and the tokenizers package give for each sample text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    for name, (post, config) in TOKENIZER_CASES.items():
        if post == "llama":
            vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
            vocab.update({chr(c): 4 + i for i, c in enumerate(range(32, 127))})
            tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
            tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
            tok.add_special_tokens(["<unk>", "<s>", "</s>"])
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        else:
            tok = byte_level_tokenizer()
            if post == "bos":
                tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                                   special_tokens=[("<bos>", 256)])
            elif post == "bytelevel":
                tok.post_processor = processors.ByteLevel(trim_offsets=False)
        path = os.path.join(folder, name)
        os.makedirs(path, exist_ok=True)
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
            json.dump(config, fh, indent=1)
        auto = transformers.AutoTokenizer.from_pretrained(path)
        # the toy SentencePiece-style vocabulary has printable ASCII only
        texts = ["Return the number of items.", "def f(x): return x + 1"] if post == "llama" else TOKENIZER_SAMPLES
        samples = [{"text": t, "transformers": auto(t)["input_ids"],
                    "tokenizers": Tokenizer.from_file(os.path.join(path, "tokenizer.json")).encode(t).ids}
                   for t in texts]
        with open(os.path.join(path, "samples.json"), "w") as fh:
            json.dump({"class": type(auto).__name__, "samples": samples}, fh, indent=1, ensure_ascii=False)


INPUT_IDS = np.random.default_rng(0).integers(0, 256, size=(2, 12)).astype(np.int64)
PROMPT = np.array([[256, 100, 101, 102, 32]], np.int64)


def official_rope(folder: str) -> None:
    """``rope.json`` beside the official DeepSeek-V3 ``config.json`` in ``folder`` (no weights):
    transformers' rope parameters, inverse frequencies, attention factor and softmax scale."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    with open(os.path.join(folder, "config.json")) as fh:
        cfg = json.load(fh)
    cfg.pop("auto_map", None)
    config = transformers.DeepseekV3Config(**cfg)
    config.standardize_rope_params()
    params = config.rope_parameters
    inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)
    scale = yarn_apply_mscale(params, (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5)
    with open(os.path.join(folder, "rope.json"), "w") as fh:
        json.dump(dict(rope_parameters=params, inv_freq=inv_freq.tolist(),
                       attention_factor=factor, softmax_scale=scale), fh, indent=1)


def save_reference(model, folder: str) -> None:
    """``save_pretrained`` plus ``reference.npz`` (logits of one forward, greedy tokens)."""
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(INPUT_IDS)).logits.float().numpy()
        greedy = model.generate(torch.from_numpy(PROMPT), max_new_tokens=8, do_sample=False,
                                attention_mask=torch.ones_like(torch.from_numpy(PROMPT)),
                                pad_token_id=258)
    np.savez(os.path.join(folder, "reference.npz"), input_ids=INPUT_IDS, logits=logits,
             prompt=PROMPT, greedy=greedy[:, PROMPT.shape[1]:].numpy())
    path = os.path.join(folder, "generation_config.json")
    if os.path.exists(path):
        os.remove(path)
    print(f"{os.path.basename(folder)}: logits std {logits.std():.4f}", flush=True)


def main() -> int:
    names = [a for a in sys.argv[1:] if not a.startswith("--")]  # variants to (re)make alone
    parts = {a for a in sys.argv[1:] if a.startswith("--")} or (
        {"--variants"} if names else {"--defaults", "--tokenizers", "--models", "--variants",
                                      "--official"})
    if "--defaults" in parts:
        config_defaults(os.path.join(ROOT, "models", "hf_defaults.py"))
    if "--official" in parts:
        official_rope(os.path.join(OUT, "deepseek_v3-official"))
    if "--tokenizers" in parts:
        byte_tokenizer(os.path.join(OUT, "tokenizer"))
        tokenizer_cases(os.path.join(OUT, "tokenizers"))
    manifest_path = os.path.join(OUT, "manifest.json")
    manifest = {"models": [], "variants": []}
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            manifest.update(json.load(fh))
    manifest.update(transformers=transformers.__version__, torch=torch.__version__)
    if "--models" in parts:
        manifest["models"] = []
        for i, arch in enumerate(ARCHS):
            for scale in ("default", "large"):
                model = build(arch, scale, seed=10 * i + (scale == "large"))
                save_reference(model, os.path.join(OUT, f"{arch}-{scale}"))
                manifest["models"].append(f"{arch}-{scale}")
    if "--variants" in parts:
        for j, (name, (arch, scale, overrides)) in enumerate(VARIANTS.items()):
            if names and name not in names:
                continue
            model = build(arch, scale, seed=100 + j, **overrides)
            save_reference(model, os.path.join(OUT, name))
        manifest["variants"] = [n for n in VARIANTS if os.path.isdir(os.path.join(OUT, n))]
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
