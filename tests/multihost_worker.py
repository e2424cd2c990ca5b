"""One process of the multi-process test (started by tests/test_multihost.py, not collected).

usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [TIMEOUT_S]
Runs both schedules of expert_parallel_moe on a mesh over every process's 4 CPU devices (1-D,
and (data=2, ep=4) with data across processes) and writes the gathered outputs to
OUT_DIR/process{PROCESS_ID}.npz.
"""

import os
import sys

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
timeout = int(sys.argv[5]) if len(sys.argv) > 5 else 60
os.environ["JAX_PLATFORMS"] = "cpu"
from moe_relayfree.distributed import emulate_cpu_devices  # noqa: E402

emulate_cpu_devices(4)  # beside the tests' other flags (helpers.script_env: no device count)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import moe_relayfree as mr  # noqa: E402
from moe_relayfree import distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import moe_inputs  # noqa: E402

try:
    distributed.initialize(f"127.0.0.1:{port}", nproc, pid, timeout_s=timeout)
except distributed.DistributedInitError as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(3)

mesh = mr.make_ep_mesh()
host = [np.asarray(a) for a in moe_inputs(32, 8, 12, 16, 2, seed=21)]


def put(a, spec):
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])


args = [put(a, P("ep")) for a in host[:3]] + [put(a, P("ep", None, None)) for a in host[3:]]
results = {}
for schedule in ("prefill", "decode"):
    y = mr.expert_parallel_moe(*args, mesh=mesh, schedule=schedule, capacity_factor=1.0)
    results[schedule] = np.asarray(multihost_utils.process_allgather(y, tiled=True))
results["devices"] = np.array([jax.device_count(), jax.process_count()])

# A (data=2, ep=4) mesh with the data axis across the processes (expert parallelism inside a
# host, data parallelism across hosts): forward of both schedules and the expert-weight
# gradient, whose sum over 'data' crosses processes.
mesh2 = mr.make_mesh({"data": 2, "ep": 4})


def put2(a, spec):
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh2, spec), lambda idx: a[idx])


tok2 = P(("data", "ep"))
args2 = [put2(a, tok2) for a in host[:3]] + [put2(a, P("ep", None, None)) for a in host[3:]]
ct = put2(np.linspace(-1, 1, host[0].size, dtype=np.float32).reshape(host[0].shape), tok2)
for schedule in ("prefill", "decode"):
    y = mr.expert_parallel_moe(*args2, mesh=mesh2, schedule=schedule, capacity_factor=1.0)
    results[f"mesh2d_{schedule}"] = np.asarray(multihost_utils.process_allgather(y, tiled=True))


def loss(wg, x, ids, w, wu, wd, ct):
    y = mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=mesh2, schedule="prefill")
    return (y * ct).sum()


grad = jax.jit(jax.grad(loss))(args2[3], *args2[:3], *args2[4:], ct)
results["mesh2d_grad_w_gate"] = np.asarray(multihost_utils.process_allgather(grad, tiled=True))
# The shipped default checkpoint, streamed: this process reads its own experts only.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_relayfree_models import checkpoint  # noqa: E402

stats = {}
checkpoint.load_model(os.path.join(os.path.dirname(__file__), "..", "models", "default"), mesh=mesh,
                      stats=stats)
results["load_bytes"] = np.array([stats["bytes_read"], stats["tensor_bytes"], stats["expert_bytes"]])
stats = {}  # on (data=2, ep=4) each process holds a whole expert-parallel group: every expert
checkpoint.load_model(os.path.join(os.path.dirname(__file__), "..", "models", "default"),
                      mesh=mesh2, stats=stats)
results["mesh2d_load_bytes"] = np.array([stats["bytes_read"], stats["tensor_bytes"]])
np.savez(os.path.join(out, f"process{pid}.npz"), **results)
distributed.shutdown()
