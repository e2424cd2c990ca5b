"""Platform self-check: every schedule, transport and baseline on the devices at hand against
the dense single-device reference, and what each compiled program contains.

The unit tests run on emulated CPU devices, where the ragged all-to-all is the project's
emulation and the grouped GEMM a CPU loop. On a GPU, TPU or an Ascend plugin the programs lower
to other ops (the native ``ragged-all-to-all``, ``ragged_dot`` or a registered kernel), so the
first thing to run on new hardware is this check (``scripts/check_platform.py``): exact outputs
under adversarial routing, gradients, and the ops XLA actually kept.

    checks = run_checks(mesh)                  # [CheckResult], one per (variant, routing, dtype)
    facts = program_facts(mesh)                # {variant: {"ops": {...}, "ragged_all_to_all": ...}}
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree import decode
from moe_relayfree.api import expert_parallel_moe
from moe_relayfree.experts import windows_swiglu
from moe_relayfree.paths import PATHS, path_settings
from moe_relayfree.reference import dense_moe_reference

ROUTINGS = ("uniform", "one_expert", "one_rank", "empty_experts", "repeated")

# Variants reached through the public API (``expert_parallel_moe`` keywords): every path of
# the table (moe_relayfree.paths.PATHS), and the relay-free settings that change its program;
# plus the decode schedule with each transport forced (``decode_moe(transport=...)``): on a GPU
# or TPU "auto" takes the windows transport only at P > k, so small meshes would never run it.
# A path that drops copies (the bounded baseline) is checked with rows for every copy.
API_VARIANTS = {name: dict(path_settings(name), **({"capacity_factor": None} if p.drops else {}))
                for name, p in PATHS.items()}
API_VARIANTS.update({
    "decode_one_pass": dict(schedule="decode", decode_overflow="one_pass"),
    # receive rows for half the copies: a skewed batch takes extra rounds
    "prefill_rounds": dict(schedule="prefill", capacity_factor=0.5),
})
REPLICATED = "decode_replicated"  # a batch smaller than the devices, on every device
TRANSPORT_VARIANTS = tuple(f"decode_{t}" for t in PATHS["decode"].transports
                           if f"decode_{t}" != REPLICATED)
VARIANTS = tuple(API_VARIANTS) + TRANSPORT_VARIANTS + (REPLICATED,)
GRAD_VARIANTS = tuple(name for name, p in PATHS.items() if p.gradients)


def variants_for(platform: str) -> tuple[str, ...]:
    """:data:`VARIANTS` that run compiled on ``platform`` (a path made for one platform, the
    Pallas TPU path, is left out elsewhere: it runs there only interpreted, for the tests)."""
    return tuple(v for v in VARIANTS if v not in PATHS or PATHS[v].native(platform))

# Largest |got - want| over largest |want|: f32 runs at "highest" matmul precision (GPUs
# otherwise use TF32 for f32 dots); bf16 rounds each expert's output and the reference's.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One check's sizes: ``tokens`` per device, ``local`` experts per device, top-``k``,
    model width ``d`` and expert width ``f``."""

    tokens: int = 6
    local: int = 4
    k: int = 4
    d: int = 64
    f: int = 96


@dataclasses.dataclass(frozen=True)
class CheckResult:
    check: str  # "output" or "grad"
    variant: str
    routing: str
    dtype: str
    error: float  # max |got - want| / max |want| (inf where got has a NaN, or it failed)
    tolerance: float
    note: str = ""  # the exception, where the program did not compile or run

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def routing_ids(kind: str, n: int, k: int, num_experts: int, num_ranks: int,
                seed: int = 0) -> np.ndarray:
    """``[n, k] int32`` expert ids per token: ``uniform``; ``one_expert`` (every first
    choice is expert 0); ``one_rank`` (every copy lands on the last rank's experts);
    ``empty_experts`` (only even experts: half the experts get nothing); ``repeated`` (ids
    repeat within a row, as a user's own router or zero-weight padding rows give them: even
    rows put all k choices on expert 0, odd rows pairs of one expert, the pairs on
    different ranks). All but ``repeated`` are distinct within a row."""
    rng = np.random.default_rng(seed)
    local = num_experts // num_ranks
    if kind == "uniform":
        return np.argsort(rng.random((n, num_experts)), axis=1)[:, :k].astype(np.int32)
    if kind == "one_expert":
        rest = [rng.choice(np.arange(1, num_experts), k - 1, replace=False) for _ in range(n)]
        return np.array([[0, *r] for r in rest], np.int32).reshape(n, k)
    if kind == "one_rank":
        if local < k:
            raise ValueError(f"one_rank needs k <= experts per rank, got k={k}, {local} per rank")
        base = (num_ranks - 1) * local
        return np.stack([base + rng.choice(local, k, replace=False) for _ in range(n)]).astype(np.int32)
    if kind == "empty_experts":
        return np.stack([2 * rng.choice(num_experts // 2, k, replace=False)
                         for _ in range(n)]).astype(np.int32)
    if kind == "repeated":
        pairs = (np.arange(k) // 2 * local + np.arange(n)[:, None]) % num_experts
        return np.where(np.arange(n)[:, None] % 2 == 0, 0, pairs).astype(np.int32)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")


def fit_shapes(shapes: Shapes, num_ranks: int) -> Shapes:
    """``shapes`` with ``k`` lowered where every routing pattern could not pick ``k`` distinct
    experts: ``one_rank`` needs ``k <= local``, ``empty_experts`` ``k <= E / 2`` (one device
    with 4 local experts: k=2)."""
    k = max(1, min(shapes.k, shapes.local, num_ranks * shapes.local // 2))
    return dataclasses.replace(shapes, k=k)


def _num_ranks(mesh: Mesh, axis: str) -> int:
    return mesh.shape[axis]


def _num_tokens(variant: str, mesh: Mesh, shapes: Shapes, axis: str) -> int:
    # a replicated batch is smaller than the devices; P - 1 of them (1 on one device, where the
    # check then runs the ordinary split path)
    p = _num_ranks(mesh, axis)
    return max(1, p - 1) if variant == REPLICATED else p * shapes.tokens


def inputs(mesh: Mesh, variant: str, routing: str, dtype, shapes: Shapes, axis: str = "ep",
           seed: int = 0) -> list:
    """x ``[N, d]``, ids ``[N, k]``, weights ``[N, k]`` f32, w_gate / w_up ``[E, d, f]``,
    w_down ``[E, f, d]`` (E = P * local), placed as the variant takes them."""
    p = _num_ranks(mesh, axis)
    n, e = _num_tokens(variant, mesh, shapes, axis), p * shapes.local
    rng = np.random.default_rng(seed)
    tok = NamedSharding(mesh, P() if variant == REPLICATED and p > 1 else P(axis))
    exp = NamedSharding(mesh, P(axis, None, None))
    x = rng.standard_normal((n, shapes.d))
    w = rng.uniform(0.1, 1.0, (n, shapes.k))
    weights = [rng.standard_normal(s) / np.sqrt(s[1]) for s in
               ((e, shapes.d, shapes.f), (e, shapes.d, shapes.f), (e, shapes.f, shapes.d))]
    ids = routing_ids(routing, n, shapes.k, e, p, seed)
    return ([jax.device_put(jnp.asarray(x, dtype), tok), jax.device_put(jnp.asarray(ids), tok),
             jax.device_put(jnp.asarray(w, jnp.float32), tok)]
            + [jax.device_put(jnp.asarray(a, dtype), exp) for a in weights])


def variant_fn(mesh: Mesh, variant: str, num_experts: int, axis: str = "ep") -> Callable:
    """The variant as one function of (x, ids, weights, w_gate, w_up, w_down) -> ``[N, d]``."""
    if variant in API_VARIANTS:
        kw = API_VARIANTS[variant]
        return lambda *a: expert_parallel_moe(*a, mesh=mesh, axis=axis, **kw)
    if variant == REPLICATED:
        return lambda *a: expert_parallel_moe(*a, mesh=mesh, axis=axis, schedule="decode")
    if variant not in TRANSPORT_VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    transport = variant.split("_", 1)[1]

    def body(x, ids, w, wg, wu, wd):
        return decode.decode_moe(x, ids, w, lambda win: windows_swiglu(win, wg, wu, wd),
                                 num_experts=num_experts, axis_name=axis, transport=transport)

    tok, exp = P(axis), P(axis, None, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (exp,) * 3, out_specs=tok)


def _error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {got.shape}, reference {want.shape}")
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _reference_grad(x, ids, w, wg, wu, wd, cot):
    def loss(x, w, wg, wu, wd):
        y = dense_moe_reference(x, ids, w, wg, wu, wd).astype(jnp.float32)
        return jnp.sum(y * cot)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)


def run_checks(mesh: Mesh, *, axis: str = "ep", shapes: Shapes = Shapes(),
               variants: Sequence[str] = VARIANTS, routings: Sequence[str] = ROUTINGS,
               dtypes: Sequence = (jnp.float32, jnp.bfloat16),
               grad_variants: Sequence[str] = GRAD_VARIANTS,
               extra: dict[str, Callable] | None = None) -> list[CheckResult]:
    """Every (variant, routing, dtype) output against :func:`dense_moe_reference`, and the
    gradients of ``grad_variants`` (f32, uniform routing) with respect to x, the routing
    weights and the three expert weights. ``extra``: more variants ``{name: fn(mesh,
    num_experts) -> fn(*inputs)}`` checked the same way (split tokens)."""
    e = _num_ranks(mesh, axis) * shapes.local
    shapes = fit_shapes(shapes, _num_ranks(mesh, axis))
    fns = {v: variant_fn(mesh, v, e, axis) for v in variants}
    fns.update({name: make(mesh, e) for name, make in (extra or {}).items()})
    results = []
    with jax.default_matmul_precision("highest"):
        for dtype in dtypes:
            name = jnp.dtype(dtype).name
            for v, fn in fns.items():
                compiled = None
                for routing in routings:
                    try:
                        args = inputs(mesh, v, routing, dtype, shapes, axis)
                        want = dense_moe_reference(*(np.asarray(a) for a in args))
                        # one compile per (variant, dtype): the routings share shapes
                        compiled = compiled or jax.jit(fn).lower(*args).compile()
                        error, note = _error(compiled(*args), want), ""
                    except Exception as exc:  # reported, so one variant cannot hide the rest
                        error, note = float("inf"), _describe(exc)
                    results.append(CheckResult("output", v, routing, name, error,
                                               TOLERANCE[name], note))
        for v in grad_variants:
            try:
                fn = fns[v] if v in fns else variant_fn(mesh, v, e, axis)
                results += _grad_checks(mesh, v, fn, shapes, axis)
            except Exception as exc:
                results.append(CheckResult("grad", v, "uniform", "float32", float("inf"),
                                           TOLERANCE["float32"], _describe(exc)))
    return results


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _grad_checks(mesh, variant, fn, shapes, axis) -> list[CheckResult]:
    x, ids, w, wg, wu, wd = inputs(mesh, variant, "uniform", jnp.float32, shapes, axis)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)

    @jax.jit
    def grads(x, w, wg, wu, wd):
        return jax.grad(lambda *a: jnp.sum(fn(a[0], ids, *a[1:]) * cot),
                        argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)

    got = grads(x, w, wg, wu, wd)
    host = [np.asarray(a) for a in (x, ids, w, wg, wu, wd)]
    want = _reference_grad(*host, np.asarray(cot))
    return [CheckResult(f"grad {wrt}", variant, "uniform", "float32", _error(g, r),
                        TOLERANCE["float32"])
            for wrt, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), got, want)]


# --- what the compiled programs contain ---------------------------------------------------

# `%name = f32[8,16]{1,0} opcode(...)` or a tuple shape `(f32[8]{0}, s32[])` before the opcode
_HLO_OP = re.compile(r"=\s*(?:\([^)]*\)|\S+)\s+([a-z][a-z0-9\-]*)\(")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_BATCHED_DOT = re.compile(r"\sdot\(.*lhs_batch_dims=\{\d")
OPS_OF_INTEREST = (
    "ragged-all-to-all", "all-to-all", "all-gather", "all-gather-start", "reduce-scatter",
    "all-reduce", "all-reduce-start", "collective-permute", "ragged-dot", "dot", "sort",
    "conditional", "while", "scatter", "gather", "custom-call",
)


def compiled_ops(text: str) -> dict:
    """Counts of the ops that matter for a MoE layer in a compiled HLO module
    (``jit(f).lower(...).compile().as_text()``), over all its computations (fusion bodies
    and async wrappers included), with ``custom_call_targets`` and ``batched_dots`` (dots
    with batch dimensions: how XLA:GPU expands a ``ragged_dot`` it has no grouped GEMM for)."""
    counts = collections.Counter(_HLO_OP.findall(text))
    out = {op: counts[op] for op in OPS_OF_INTEREST if counts[op]}
    out["batched_dots"] = sum(1 for line in text.splitlines() if _BATCHED_DOT.search(line))
    out["custom_call_targets"] = sorted(set(_CUSTOM_CALL_TARGET.findall(text)))
    return out


def program_facts(mesh: Mesh, *, axis: str = "ep", shapes: Shapes = Shapes(),
                  variants: Sequence[str] = VARIANTS, dtype=jnp.bfloat16) -> dict:
    """For each variant's program compiled for ``mesh``: its op counts (:func:`compiled_ops`),
    whether the ragged all-to-all stayed a native op, and how the grouped GEMM was compiled
    ("ragged-dot", "custom-call", "batched dot": padded per-expert matrices, or "dot loop")."""
    e = _num_ranks(mesh, axis) * shapes.local
    facts = {}
    for v in variants:
        args = inputs(mesh, v, "uniform", dtype, shapes, axis)
        ops = compiled_ops(jax.jit(variant_fn(mesh, v, e, axis)).lower(*args).compile().as_text())
        gemm = ("ragged-dot" if ops.get("ragged-dot") else "batched dot" if ops["batched_dots"]
                else "dot loop" if ops.get("dot") else "custom-call")
        facts[v] = {"ops": ops, "native_ragged_all_to_all": bool(ops.get("ragged-all-to-all")),
                    "grouped_gemm": gemm}
    return facts


@functools.lru_cache(maxsize=None)
def _timed_fn(mesh: Mesh, variant: str, num_experts: int, axis: str):
    return jax.jit(variant_fn(mesh, variant, num_experts, axis))


TIMED = ("decode", "decode_one_pass", "prefill") + tuple(
    name for name, p in PATHS.items() if p.implementation != "relayfree" and not p.drops)


def time_variants(mesh: Mesh, tokens: int, *, axis: str = "ep", shapes: Shapes = Shapes(),
                  variants: Sequence[str] = TIMED,
                  dtype=jnp.bfloat16, rounds: int = 20, seconds: float = 0.0) -> dict:
    """Layer time of each variant at ``tokens`` per device (uniform routing), programs called
    alternately in the same process. Returns ``{variant: median seconds}`` and per-round
    ratios to ``variants[0]`` as ``{variant + "/" + variants[0]: median ratio}``."""
    from moe_relayfree.tools.bench.timing import interleaved

    e = _num_ranks(mesh, axis) * shapes.local
    sized = dataclasses.replace(shapes, tokens=tokens)
    args = inputs(mesh, "decode", "uniform", dtype, sized, axis)
    fns = {v: _timed_fn(mesh, v, e, axis) for v in variants}
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = interleaved(fns, args, min_rounds=rounds, seconds=seconds)
    out = {v: float(np.median(t)) for v, t in times.items()}
    first = variants[0]
    out.update({f"{v}/{first}": float(np.median(times[v] / times[first])) for v in variants[1:]})
    return out
