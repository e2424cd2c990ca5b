"""Same process, interleaved: the prefill schedule of this checkout against the one of 98aa79e
(round 0 inline, the skew rounds in a conditional beside it; read from git, so run it inside
the repository), 8 CPU devices; prints one line per layer, then JSON.

    python results/cpu-ab/rounds_form.py > results/cpu-ab/rounds_form.txt
"""
import json
import os
import subprocess
import sys
import time
import types

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import moe_relayfree as mr  # noqa: E402
from moe_relayfree import prefill  # noqa: E402
from moe_relayfree.tools.bench.inputs import layer_inputs  # noqa: E402
from moe_relayfree.tools.bench.timing import interleaved, ratio_summary  # noqa: E402

BEFORE = "98aa79e"


def schedule_at(commit: str) -> types.ModuleType:
    """moe_relayfree/prefill.py of ``commit`` as a module (it imports today's package)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = subprocess.run(["git", "-C", root, "show", f"{commit}:moe_relayfree/prefill.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"prefill_{commit}")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, f"{commit}:moe_relayfree/prefill.py", "exec"), module.__dict__)
    return module


mesh = mr.make_ep_mesh(8)
forms = {"now": prefill.prefill_moe, "before": schedule_at(BEFORE).prefill_moe}
out = {}
for name, (E, k, d, f, T, dt) in {
    "prefill E64 T256 f32": (64, 8, 1024, 512, 256, jnp.float32),
    "prefill E64 T256 bf16": (64, 8, 1024, 512, 256, jnp.bfloat16),
    "prefill E256 T512 bf16": (256, 8, 1024, 256, 512, jnp.bfloat16),
}.items():
    args = layer_inputs(mesh, T, E, k, d, f, dtype=dt)
    progs, compile_s, values = {}, {}, {}
    for label, form in forms.items():
        prefill.prefill_moe = form  # read when the layer is traced
        jitted = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule="prefill"))
        start = time.perf_counter()
        progs[label] = jitted.lower(*args).compile()
        compile_s[label] = time.perf_counter() - start
        values[label] = np.asarray(progs[label](*args).astype(jnp.float32))
    prefill.prefill_moe = forms["now"]
    times = interleaved(progs, args, min_rounds=21)
    out[name] = dict(now_ms=float(np.median(times["now"]) * 1e3),
                     before_ms=float(np.median(times["before"]) * 1e3),
                     now_over_before=ratio_summary(times["now"] / times["before"]),
                     rounds=len(times["now"]), compile_s=compile_s,
                     same_values=bool(np.array_equal(values["now"], values["before"])))
    print(name, out[name], flush=True)
print(json.dumps(out))
