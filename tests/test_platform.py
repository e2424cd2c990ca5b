"""Platform hook and capability registry: plugin validation errors, registration order,
fallback, and vendor implementations actually used at lowering time."""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_relayfree import experts, platform
from moe_relayfree.experts import grouped_swiglu

CC = shutil.which("cc") or shutil.which("gcc")


def build_so(tmp_path, name, source):
    if CC is None:
        pytest.skip("no C compiler to build a test library")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return str(out)


def test_validation_errors(tmp_path):
    with pytest.raises(platform.PluginError, match="does not exist"):
        platform.validate_plugin_library(str(tmp_path / "nope.so"))
    text = tmp_path / "plain.txt"
    text.write_text("not a library")
    with pytest.raises(platform.PluginError, match="not a loadable shared library"):
        platform.validate_plugin_library(str(text))
    other = build_so(tmp_path, "other", "int answer(void) { return 42; }")
    with pytest.raises(platform.PluginError, match="exports no GetPjrtApi"):
        platform.validate_plugin_library(other)
    fake = build_so(tmp_path, "fake_pjrt", "void* GetPjrtApi(void) { return 0; }")
    assert platform.validate_plugin_library(fake) == os.path.abspath(fake)
    with pytest.raises(platform.PluginError, match="no PJRT plugin library given"):
        platform.validate_plugin_library(None)


def test_registration_after_jax_started_is_refused_and_can_fall_back(tmp_path, monkeypatch):
    jax.devices()  # backends are up in this process
    fake = build_so(tmp_path, "fake_pjrt", "void* GetPjrtApi(void) { return 0; }")
    with pytest.raises(platform.PluginError, match="already initialised"):
        platform.register_pjrt_plugin(fake)
    monkeypatch.setenv(platform.ENV_VAR, fake)  # the variable is read when no path is passed
    with pytest.raises(platform.PluginError, match="already initialised"):
        platform.register_pjrt_plugin()
    with pytest.warns(UserWarning, match="falling back to CPU"):
        assert platform.register_pjrt_plugin(str(tmp_path / "missing.so"), fallback_to_cpu=True) is None


def test_registration_before_jax_starts_reaches_jax(tmp_path, monkeypatch):
    """Before backends start, a validated library goes to JAX's plugin registry with the
    given name, priority and options. (JAX loads the library right there and calls
    GetPjrtApi, so no fake library can go further; a real plugin is not available here.)"""
    from jax._src import xla_bridge

    fake = build_so(tmp_path, "fake_pjrt", "void* GetPjrtApi(void) { return 0; }")
    seen = []
    monkeypatch.setattr(platform, "_backends_initialized", lambda: False)
    monkeypatch.setattr(xla_bridge, "register_plugin", lambda name, **kw: seen.append((name, kw)))
    assert platform.register_pjrt_plugin(fake, name="ascend", options={"a": 1}) == "ascend"
    assert seen == [("ascend", dict(priority=400, library_path=os.path.abspath(fake), options={"a": 1}))]


def test_vendor_grouped_gemm_is_used_on_cpu():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    gs = jnp.array([5, 0, 7], jnp.int32)
    w = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4, 6), (3, 4, 6), (3, 6, 4))]
    calls = []

    def vendor(x, gs, wg, wu, wd):
        calls.append(x.shape)
        return 3 * experts.grouped_swiglu_tiled(x, gs, wg, wu, wd)

    want = np.asarray(jax.jit(grouped_swiglu)(x, gs, *w))
    platform.set_platform_impls("cpu", grouped_swiglu=vendor)
    try:
        assert platform.capabilities()["cpu"]["grouped_swiglu"] == "vendor"
        # a new function: jit caches traces per function, so register before the first trace
        got = np.asarray(jax.jit(lambda *a: grouped_swiglu(*a))(x, gs, *w))
    finally:
        experts.register_grouped_swiglu("cpu", experts.grouped_swiglu_tiled)
    assert calls and np.allclose(got, 3 * want, atol=1e-5)
    assert platform.capabilities()["cpu"]["grouped_swiglu"] == "grouped_swiglu_tiled"
    assert platform.capabilities()["default"]["ragged_all_to_all"] == "native"


def test_a_vendor_kernel_that_asks_for_expected_rows_gets_the_windows_hint():
    """set_platform_impls(..., grouped_swiglu_takes_expected_rows=True): windows_swiglu hands
    the kernel the windows' usual row count; without the flag the kernel never sees it."""
    from moe_relayfree.windows import ExpertWindows

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    gs = jnp.array([3, 0, 2], jnp.int32)
    w = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 4, 6), (3, 4, 6), (3, 6, 4))]
    windows = ExpertWindows(rows=x, group_sizes=gs, expected_rows=5)
    seen = []

    def vendor(x, gs, wg, wu, wd, expected_rows=None):
        seen.append(expected_rows)
        return experts.grouped_swiglu_tiled(x, gs, wg, wu, wd)

    want = np.asarray(jax.jit(grouped_swiglu)(x, gs, *w))
    try:
        for flag in (True, False):
            platform.set_platform_impls("cpu", grouped_swiglu=vendor,
                                        grouped_swiglu_takes_expected_rows=flag)
            got = jax.jit(lambda win, *w: experts.windows_swiglu(win, *w))(windows, *w)
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    finally:
        experts.register_grouped_swiglu("cpu", experts.grouped_swiglu_tiled)
    assert seen == [5, None]


def test_impls_for_a_plugin_platform_leave_cpu_lowering_alone():
    x, gs = jnp.ones((8, 4)), jnp.array([3, 5], jnp.int32)
    w, wd = jnp.ones((2, 4, 6)), jnp.ones((2, 6, 4))
    want = np.asarray(jax.jit(grouped_swiglu)(x, gs, w, w, wd))
    platform.set_platform_impls("ascend", grouped_swiglu=lambda *a: 7 * experts.grouped_swiglu_tiled(*a))
    try:
        assert "ascend" in platform.capabilities()
        got = np.asarray(jax.jit(lambda *a: grouped_swiglu(*a))(x, gs, w, w, wd))
    finally:
        experts.register_grouped_swiglu("ascend", None)
    np.testing.assert_array_equal(got, want)
    assert "ascend" not in platform.capabilities()
