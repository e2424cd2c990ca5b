"""Model-level tooling (the core's layer-level tools: :mod:`moe_relayfree.tools`): whole-model
XLA:TPU compiles (:mod:`.aot`) and the benchmarks that run a model (:mod:`.bench`)."""
