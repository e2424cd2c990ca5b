"""Where a layer's time goes on emulated CPU devices, from XLA:CPU's own profile
(``moe_relayfree.tools.bench.profile`` says how the trace is reduced: self time per op class
and thread kind, thread-ms per call).

    python scripts/profile_layer.py --experts 256 --tokens 16          # decode vs prefill
    python scripts/profile_layer.py --impls decode prefill ragged_baseline --calls 20
    python scripts/profile_layer.py --smoke --out /tmp/p

``--checkpoint DIR --batch N`` profiles a whole model's decode step instead (``infer.py``'s
jitted step, one token for each of ``N`` sequences), once per dispatch path (``relayfree``,
``ragged-baseline``, ``capacity-baseline``): where a serving step's time goes, the MoE layers
among the rest of the model.

    python scripts/profile_layer.py --checkpoint models/default --batch 16
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_relayfree.tools.bench import env, report
from moe_relayfree.tools.bench.variants import EXCHANGES, LAYERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=256, choices=(64, 256))
    p.add_argument("--tokens", type=int, default=16, help="tokens per rank")
    p.add_argument("--impls", nargs="+", default=["decode", "prefill"], choices=LAYERS + EXCHANGES)
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--calls", type=int, default=10, help="calls traced per implementation")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    p.add_argument("--checkpoint", default=None, help="profile this model's decode step instead")
    p.add_argument("--batch", type=int, default=16, help="sequences in the decode step")
    p.add_argument("--paths", nargs="+", default=["relayfree", "capacity-baseline"],
                   help="dispatch paths for --checkpoint (infer.py's --dispatch names)")
    p.add_argument("--out", default="results/profile")
    a = p.parse_args(argv)
    env.emulate_cpu_devices(8)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from moe_relayfree.tools.bench import profile

    if a.checkpoint:
        case = dict(checkpoint=a.checkpoint, batch=a.batch)
        from moe_relayfree_models.tools.bench.profile_step import run_step

        impls = run_step(a.checkpoint, a.batch, list(a.paths), rounds=a.rounds, calls=a.calls)
        stem = f"step_{os.path.basename(os.path.normpath(a.checkpoint))}_B{a.batch}"
    else:
        case = (dict(E=16, f=16, T=4, k=2, d=32) if a.smoke else
                dict(E=a.experts, f=512 if a.experts == 64 else 256, T=a.tokens, k=8, d=1024))
        impls = profile.run(case, list(a.impls), rounds=a.rounds, calls=a.calls)
        stem = f"profile_E{case['E']}_T{case['T']}"
    out = {"case": case, "impls": impls, "command": env.command("profile_layer.py", argv)}
    text = profile.markdown(out)
    print(text)
    print("wrote " + ", ".join(report.write(a.out, stem, out, text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
