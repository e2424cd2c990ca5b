"""The benchmarks that run a whole model, behind thin ``scripts/`` commands:
:mod:`.serving` (``sweep.py``), :mod:`.generation` (``bench_generation.py``), :mod:`.loading`
(``bench_load.py``), :mod:`.profile_step` (``profile_layer.py --checkpoint``). Their shared
parts (timing, reports, the command line) are the core's :mod:`moe_relayfree.tools.bench`.
"""
