"""Writes a randomly initialised MoE checkpoint folder of any supported family (``--arch``:
Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3; ``config.json`` + ``model.safetensors``, bf16)
of a chosen shape, e.g. for a serving sweep on a model whose MoE
layers carry most of the step (the built-in default model is trained but MoE-light: E=8, k=2,
d=128). Nothing is downloaded; routing is that of an untrained router (near uniform).

    python scripts/make_random_checkpoint.py --experts 64 --k 8 --d-model 256 --out /tmp/moe64
    python scripts/sweep.py --checkpoint /tmp/moe64 --batches 1 16 32 64 --prompt-lengths 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moe_relayfree_models.config import ARCHITECTURES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff-expert", type=int, default=256)
    p.add_argument("--layers", type=int, default=4,
                   help="the first dense, the rest MoE (mixtral, olmoe: all MoE)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default: the byte-level 259, which infer.py can "
                   "tokenize; others run in sweep.py and profile_layer.py, which make their "
                   "own token ids)")
    p.add_argument("--arch", choices=list(ARCHITECTURES), default="qwen3_moe",
                   help="the family's attention and routing: deepseek_v3 MLA (latent d/4, heads "
                   "of 64+32) with DeepSeek routing; qwen2_moe a gated shared expert and qkv "
                   "bias; mixtral and olmoe every layer MoE (olmoe with its q/k norms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.layers < 2 or not 1 <= args.k <= args.experts or args.d_model % 64:
        p.error("need --layers >= 2, 1 <= --k <= --experts and --d-model a multiple of 64")
    if args.vocab is not None and args.vocab < 128:
        p.error("--vocab must be >= 128 (sweep.py draws prompt ids from 32..126)")

    import ml_dtypes
    from flax import nnx
    from safetensors.numpy import save_file

    from moe_relayfree_models import checkpoint, tokenizer
    from moe_relayfree_models.config import ModelConfig
    from moe_relayfree_models.hf_config import to_hf_config
    from moe_relayfree_models.transformer import MoETransformer
    from moe_relayfree import make_ep_mesh

    from moe_relayfree.routing import RouterConfig

    common = dict(vocab_size=args.vocab or tokenizer.VOCAB_SIZE, d_model=args.d_model,
                  n_layers=args.layers, n_heads=args.d_model // 64, d_ff=2 * args.d_model,
                  num_experts=args.experts, k=args.k, d_ff_expert=args.d_ff_expert,
                  moe_layers=(False,) + (True,) * (args.layers - 1))
    if args.arch == "deepseek_v3":  # DeepSeek-V3's ratios: latent d/14 (512 of 7168), heads of 192
        cfg = ModelConfig(arch="deepseek_v3", **common, n_kv_heads=args.d_model // 64,
                          head_dim=64, max_position=16384, q_lora_rank=args.d_model // 4,
                          kv_lora_rank=max(16, args.d_model // 4), qk_nope_head_dim=64,
                          qk_rope_head_dim=32, v_head_dim=64, shared_d_ff=args.d_ff_expert,
                          router=RouterConfig(method="sigmoid_grouped", n_group=4, topk_group=2,
                                              routed_scaling_factor=2.5, score_bias=True))
    else:
        gqa = dict(n_kv_heads=max(1, args.d_model // 128), head_dim=64, max_position=1024)
        every = dict(moe_layers=(True,) * args.layers)  # Mixtral and OLMoE have no dense layer
        family = {
            "qwen3_moe": dict(qk_norm="head"),
            "qwen2_moe": dict(qkv_bias=True, shared_d_ff=args.d_ff_expert, shared_gate=True,
                              router=RouterConfig(renormalize=False)),
            "mixtral": dict(every, router=RouterConfig(renormalize=True)),
            "olmoe": dict(every, qk_norm="full", router=RouterConfig(renormalize=False)),
        }[args.arch]
        cfg = ModelConfig(arch=args.arch, **dict(common, **gqa, **family))
    model = MoETransformer(cfg, mesh=make_ep_mesh(1), rngs=nnx.Rngs(args.seed))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(to_hf_config(cfg), fh, indent=1)
    save_file(checkpoint.export_tensors(model, dtype=ml_dtypes.bfloat16),
              os.path.join(args.out, "model.safetensors"),
              metadata={"made_by": "scripts/make_random_checkpoint.py " + " ".join(argv or sys.argv[1:])})
    print(f"wrote {args.out}: E={args.experts} k={args.k} d={args.d_model} "
          f"f_expert={args.d_ff_expert} layers={args.layers} (random init)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
