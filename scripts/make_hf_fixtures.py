"""Builds tiny random Hugging Face MoE models and their reference outputs as test fixtures.

Needs torch and transformers, which the project itself never imports; run it from a separate
environment (CPU torch 2.13.0 is on this machine's local disk):

    python3 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy
    .venv-hf/bin/python scripts/make_hf_fixtures.py       # writes tests/fixtures/hf/

Per architecture and init scale ("default": the architecture's own init, "large": std 0.3 and
random norm weights, so logits differ visibly between tokens), the folder holds the model as
``save_pretrained`` writes it (``config.json`` + ``model.safetensors``) and ``reference.npz``:
``input_ids [2, 12]``, ``logits [2, 12, V]`` (float32, one forward), ``prompt [1, 5]`` and
``greedy [1, 8]`` (``generate`` with ``do_sample=False``). ``tokenizer/`` holds the byte-level
tokenizer as a Hugging Face ``tokenizer.json`` and the ids it produces for sample texts.
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


def build(arch: str, scale: str, seed: int):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kwargs = dict(COMMON, **extra)
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


def byte_tokenizer(folder: str) -> None:
    """The project's byte-level tokenizer (ids 0-255 = bytes, 256 BOS, 257 EOS, 258 PAD) as a
    Hugging Face ``tokenizer.json``, plus the ids it gives for a few texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    samples = [{"text": t, "ids": tok.encode(t).ids} for t in TOKENIZER_SAMPLES]
    with open(os.path.join(folder, "samples.json"), "w") as fh:
        json.dump(samples, fh, indent=1, ensure_ascii=False)


def main() -> int:
    byte_tokenizer(os.path.join(OUT, "tokenizer"))
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 256, size=(2, 12)).astype(np.int64)
    prompt = np.array([[256, 100, 101, 102, 32]], np.int64)
    manifest = {"transformers": transformers.__version__, "torch": torch.__version__, "models": []}
    for i, arch in enumerate(ARCHS):
        for scale in ("default", "large"):
            model = build(arch, scale, seed=10 * i + (scale == "large"))
            folder = os.path.join(OUT, f"{arch}-{scale}")
            model.save_pretrained(folder, safe_serialization=True)
            with torch.no_grad():
                logits = model(torch.from_numpy(input_ids)).logits.float().numpy()
                greedy = model.generate(torch.from_numpy(prompt), max_new_tokens=8, do_sample=False,
                                        attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                        pad_token_id=258)
            np.savez(os.path.join(folder, "reference.npz"), input_ids=input_ids, logits=logits,
                     prompt=prompt, greedy=greedy[:, prompt.shape[1]:].numpy())
            for extra in ("generation_config.json",):
                path = os.path.join(folder, extra)
                if os.path.exists(path):
                    os.remove(path)
            manifest["models"].append(f"{arch}-{scale}")
            print(f"{arch}-{scale}: logits std {logits.std():.4f}", flush=True)
    with open(os.path.join(OUT, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
