"""Tests run on CPU with 8 emulated devices; XLA_FLAGS must be set before JAX is imported."""

import os

# LLVM at -O0 for the tests' programs: XLA's HLO passes (what the tests read in compiled
# programs) run as always, only the machine-code optimization is skipped; on these tiny shapes
# compiling is most of the time (tests/test_layer.py + test_decode.py: 94 -> 71 s). And XLA:CPU's
# older fusion emitters (LLVM IR straight from each fusion) instead of the MLIR ones, whose
# per-fusion pipelines were most of what was left: six prefill-layer programs 10.7 -> 6.9 s, the
# served-tokens test 66 -> 50 s; the HLO is the same, only its machine code is emitted otherwise.
# Scripts the tests start get the same flags (helpers.script_env).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the xdist workers and the scripts
# the tests start (they inherit the environment): many programs (the default model's steps,
# a module's fixtures split over both workers) are otherwise compiled once per process.
# (The pytest process that creates it, the xdist controller, removes it at the end.)
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="moe-relayfree-tests-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tracing makes many short-lived Python objects: the collector runs 140x less often than by
# default (every 100,000 net allocations instead of 700); the served-tokens test with
# test_layer.py's forward/backward: 73-76 -> 68-70 s.
gc.set_threshold(100_000, 50, 100)

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) >= 8, "tests need 8 emulated CPU devices"
    return devs


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
