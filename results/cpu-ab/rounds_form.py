"""Same process, interleaved: the prefill schedule of this checkout against prefill_before.py
(moe_relayfree/prefill.py of 98aa79e: round 0 inline, the skew rounds in a conditional beside
it), 8 CPU devices; prints one line per layer, then JSON.

    python results/cpu-ab/rounds_form.py > results/cpu-ab/rounds_form.txt
"""
import os, json, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import moe_relayfree as mr
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prefill_before as _prefill_before  # noqa: E402
from moe_relayfree import prefill  # noqa: E402
from moe_relayfree.tools.bench.timing import interleaved, median_ci
mesh = mr.make_ep_mesh(8)
tok, exp = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P("ep", None, None))
out = {}
now_fn = prefill.prefill_moe
for name, (E, k, d, f, T, dt) in {
    "prefill E64 T256 f32": (64, 8, 1024, 512, 256, jnp.float32),
    "prefill E64 T256 bf16": (64, 8, 1024, 512, 256, jnp.bfloat16),
    "prefill E256 T512 bf16": (256, 8, 1024, 256, 512, jnp.bfloat16),
}.items():
    rng = np.random.default_rng(0)
    n = 8 * T
    x = jax.device_put(jnp.asarray(rng.standard_normal((n, d)), dt), tok)
    ids = jax.device_put(jnp.asarray(np.argsort(rng.random((n, E)), 1)[:, :k], jnp.int32), tok)
    w = jax.device_put(jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32), tok)
    ws = [jax.device_put(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dt), exp)
          for s in ((E, d, f), (E, d, f), (E, f, d))]
    args = (x, ids, w, *ws)
    progs, comp, outs = {}, {}, {}
    for label, fn in (("now", now_fn), ("before", _prefill_before.prefill_moe)):
        prefill.prefill_moe = fn
        jitted = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule="prefill"))
        t0 = time.perf_counter(); progs[label] = jitted.lower(*args).compile(); comp[label] = time.perf_counter() - t0
        outs[label] = np.asarray(progs[label](*args).astype(jnp.float32))
    prefill.prefill_moe = now_fn
    times = interleaved(progs, args, min_rounds=21)
    r = times["now"] / times["before"]
    out[name] = dict(now_ms=float(np.median(times["now"]) * 1e3), before_ms=float(np.median(times["before"]) * 1e3),
                     ratio=float(np.median(r)), ci95=median_ci(r), rounds=len(r),
                     compile_now_s=comp["now"], compile_before_s=comp["before"],
                     same_values=bool(np.array_equal(outs["now"], outs["before"])))
    print(name, out[name], flush=True)
print(json.dumps(out))
