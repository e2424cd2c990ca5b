"""Command-line settings of a served model, shared by ``scripts/infer.py`` and the benchmarks
that serve a checkpoint (``sweep.py``, ``profile_layer.py``): the mesh, the dispatch path."""

from __future__ import annotations

import argparse
import os

from moe_relayfree.paths import IMPLEMENTATIONS, PATHS

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")
# --dispatch names -> DispatchConfig.implementation: every implementation of the table of paths
DISPATCH = {impl.replace("_", "-"): impl for impl in IMPLEMENTATIONS}
# the ones that never drop a copy and run compiled wherever XLA does (what a comparison of
# generated tokens can take; the Pallas TPU path runs only interpreted off a TPU)
DROPLESS = {name: impl for name, impl in DISPATCH.items()
            if not any(p.drops or p.platforms is not None
                       for p in PATHS.values() if p.implementation == impl)}


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse then prints one line naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags every command that runs a model takes (``scripts/infer.py``,
    ``scripts/serve.py``): the checkpoint, devices and mesh, the dispatch path and its
    settings, dtypes, the compilation cache, several processes."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="Hugging Face folder")
    p.add_argument("--devices", type=positive_int, default=8,
                   help="emulated CPU devices (CPU only; default 8)")
    add_mesh_args(p)
    add_cache_args(p)
    p.add_argument("--dispatch", choices=sorted(DISPATCH), default="relayfree")
    p.add_argument("--schedule", choices=["auto", "prefill", "decode"], default="auto")
    p.add_argument("--decode-threshold", type=int, default=None,
                   help="tokens per device at or below which auto picks decode (default: the platform's)")
    p.add_argument("--capacity-factor", type=float, default=2.0,
                   help="prefill receive rows per round, times T*k (skew takes more rounds; default 2)")
    p.add_argument("--decode-overflow", choices=["branch", "one_pass"], default="branch",
                   help="decode rows past 2*T*k: a conditional pass, or all worst-case rows in one")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="parameter dtype, which the activations and KV cache follow "
                   "(default: the checkpoint's)")
    p.add_argument("--fp8-experts", action="store_true",
                   help="an FP8 checkpoint's routed experts stay FP8 on the devices (half the "
                   "bytes; dequantized where the experts run) instead of dequantized at load")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to run over several processes")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)


def start_process(args) -> str | None:
    """What a command that runs a model does first, before any JAX backend starts: the
    emulated CPU devices (``--devices``), the multi-process job (``--coordinator``), the
    compilation cache; returns the cache's folder (None: off)."""
    from moe_relayfree.distributed import emulate_cpu_devices, initialize

    emulate_cpu_devices(args.devices)
    if args.coordinator:
        initialize(args.coordinator, args.num_processes, args.process_id)
    return apply_cache_args(args)


class SetupError(Exception):
    """A one-line reason a command cannot run (a command prints it and exits 2)."""


def prepare(args):
    """(model config, tokenizer, dispatch config) from the model flags: everything that can be
    refused before the weights load is checked here (the mesh, the dispatch settings, the
    config.json, the tokenizer). Raises :class:`SetupError`."""
    import jax

    from moe_relayfree_models import checkpoint, tokenizer

    if not os.path.exists(os.path.join(args.checkpoint, "config.json")):
        raise SetupError(f"no checkpoint at {args.checkpoint}; train the default one with "
                         "`python scripts/train_default.py` or pass --checkpoint DIR")
    try:
        mesh, _ = mesh_from_args(args, len(jax.devices()))
    except ValueError as e:
        raise SetupError(f"--mesh: {e}") from None
    try:
        dispatch = dispatch_from_args(args, mesh)
    except ValueError as e:
        raise SetupError(f"dispatch settings: {e}") from None
    try:
        cfg = checkpoint.read_config(args.checkpoint)
        # Prompts are encoded as the checkpoint's tokenizer says (config.json's bos_token_id
        # is not a promise that the tokenizer adds it; Qwen's and OLMoE's do not).
        tok = tokenizer.load_tokenizer(args.checkpoint, cfg.vocab_size)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SetupError(f"{args.checkpoint}: {e}") from None
    return cfg, tok, dispatch


def load(args, dispatch):
    """The model, loaded onto the devices; :class:`SetupError` for what the loader refuses
    (e.g. experts not divisible by the devices)."""
    from moe_relayfree_models import checkpoint

    try:
        return checkpoint.load_model(args.checkpoint, dispatch, dtype=args.dtype,
                                     fp8_experts=args.fp8_experts)
    except ValueError as e:
        raise SetupError(f"{args.checkpoint}: {e}") from None


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs in JAX's persistent compilation cache "
                   "(default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, "
                   "under moe-relayfree/jax: a second run skips most of its compiles)")


def compile_cache_dir() -> str:
    """Where compiled programs persist between runs: ``$JAX_COMPILATION_CACHE_DIR`` if set,
    else ``moe-relayfree/jax`` in the user's cache folder."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moe-relayfree", "jax")


def apply_cache_args(args) -> str | None:
    """Turns JAX's persistent compilation cache on (``--no-compile-cache``: off); returns its
    folder. Call before the first compile."""
    if args.no_compile_cache:
        return None
    import jax

    path = compile_cache_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    # every program: on CPU most compile in under JAX's default 1 s threshold, and together
    # they were most of a warm run of the main job
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None,
                   help="mesh axes as NAME=SIZE,... in order (default: ep=<all devices>)")
    p.add_argument("--expert-axis", default="ep", help="the mesh axis experts are split over")
    p.add_argument("--tensor-axis", default=None,
                   help="optional mesh axis splitting each expert's hidden width")


def mesh_from_args(args, num_devices: int):
    """(mesh, layout) from ``--mesh/--expert-axis/--tensor-axis``; ValueError names the problem."""
    import moe_relayfree as mr

    mesh = mr.make_mesh(mr.parse_mesh(args.mesh) if args.mesh else {args.expert_axis: num_devices})
    return mesh, mr.make_layout(mesh, args.expert_axis, tensor_axis=args.tensor_axis)


def dispatch_from_args(args, mesh):
    """The one :class:`moe_relayfree.DispatchConfig` the model's MoE layers get, from
    ``--expert-axis/--tensor-axis/--dispatch/--schedule/--capacity-factor/--decode-threshold/
    --decode-overflow``."""
    import moe_relayfree as mr

    return mr.DispatchConfig(mesh, axis=args.expert_axis, tensor_axis=args.tensor_axis,
                             schedule=args.schedule, implementation=DISPATCH[args.dispatch],
                             capacity_factor=args.capacity_factor,
                             decode_threshold=args.decode_threshold,
                             decode_overflow=args.decode_overflow)
