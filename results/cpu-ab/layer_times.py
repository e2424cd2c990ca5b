"""One process: time expert_parallel_moe layers (8 CPU devices) for a few cases; print JSON."""
import os, sys, json, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import moe_relayfree as mr
mesh = mr.make_ep_mesh(8)
tok, exp = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P("ep", None, None))
out = {}
for name, (E, k, d, f, T, dt, sched) in {
    "decode E64 T1 bf16": (64, 8, 1024, 512, 1, jnp.bfloat16, "decode"),
    "decode E64 T8 bf16": (64, 8, 1024, 512, 8, jnp.bfloat16, "decode"),
    "decode E64 T64 f32": (64, 8, 1024, 512, 64, jnp.float32, "decode"),
    "decode E256 T8 f32": (256, 8, 1024, 256, 8, jnp.float32, "decode"),
    "prefill E64 T256 f32": (64, 8, 1024, 512, 256, jnp.float32, "prefill"),
}.items():
    rng = np.random.default_rng(0)
    n = 8 * T
    x = jax.device_put(jnp.asarray(rng.standard_normal((n, d)), dt), tok)
    ids = jax.device_put(jnp.asarray(np.argsort(rng.random((n, E)), 1)[:, :k], jnp.int32), tok)
    w = jax.device_put(jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32), tok)
    ws = [jax.device_put(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dt), exp)
          for s in ((E, d, f), (E, d, f), (E, f, d))]
    fn = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule=sched))
    jax.block_until_ready(fn(x, ids, w, *ws))
    ts = []
    for _ in range(15):
        t0 = time.perf_counter(); jax.block_until_ready(fn(x, ids, w, *ws)); ts.append(time.perf_counter() - t0)
    out[name] = float(np.median(ts))
print(json.dumps(out))
