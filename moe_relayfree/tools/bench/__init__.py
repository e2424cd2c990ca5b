"""The benchmarks behind ``scripts/``: shared parts and one module per benchmark.

Shared: :mod:`.env` (emulated devices, the command line, the machine), :mod:`.timing`
(interleaved rounds, medians, intervals: the one way programs are compared),
:mod:`.inputs` (placed layer inputs), :mod:`.variants` (named layer programs and per-phase
implementations), :mod:`.report` (JSON and markdown out).

Layer-level benchmarks (each behind a thin ``scripts/`` command): :mod:`.layer`
(``bench.py``), :mod:`.decode` (``bench_decode.py``), :mod:`.profile` (``profile_layer.py``).
The ones that run a whole model live with the models (``moe_relayfree_models.tools.bench``).
Nothing in the core imports this package, and this package imports no model code.
"""
