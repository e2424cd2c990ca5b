"""Tooling around the library (never imported by its core): deviceless compiles for TPU
topologies (:mod:`moe_relayfree.tools.aot`)."""
