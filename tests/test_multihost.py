"""Two processes x 4 CPU devices (gloo over 127.0.0.1) give the single-process result."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import moe_relayfree as mr
from helpers import make_mesh, moe_inputs, script_env

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port() -> int:
    """A free port whose successor (the start-up rendezvous) is free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def start(pid, nproc, port, out, timeout=60):
    env = script_env()
    return subprocess.Popen([sys.executable, WORKER, str(pid), str(nproc), str(port), str(out),
                             str(timeout)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_processes_match_single_process(tmp_path):
    port = free_port()
    procs = [start(i, 2, port, tmp_path) for i in range(2)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            p.kill()
    inputs = moe_inputs(32, 8, 12, 16, 2, seed=21)
    want = {s: np.asarray(mr.expert_parallel_moe(*inputs, mesh=make_mesh(8), schedule=s,
                                                 capacity_factor=1.0))
            for s in ("prefill", "decode")}
    ref = np.asarray(mr.dense_moe_reference(*inputs))
    x, ids, w, wg, wu, wd = inputs
    ct = np.linspace(-1, 1, x.size, dtype=np.float32).reshape(x.shape)
    want_grad = np.asarray(jax.grad(
        lambda g: (mr.dense_moe_reference(x, ids, w, g, wu, wd) * ct).sum())(wg))
    for i in range(2):
        got = np.load(tmp_path / f"process{i}.npz")
        assert got["devices"].tolist() == [8, 2]  # 8 global devices over 2 processes
        # checkpoint loading: every shared tensor, and half of the experts (this process's 4 of 8)
        read, total, expert = got["load_bytes"].tolist()
        assert 0 < expert < total and read == (total - expert) + expert // 2
        for s in ("prefill", "decode"):
            np.testing.assert_allclose(got[s], want[s], atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(got[s], ref, atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(got[f"mesh2d_{s}"], ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(got["mesh2d_grad_w_gate"], want_grad, atol=5e-5, rtol=5e-5)
        read, total = got["mesh2d_load_bytes"].tolist()
        assert read == total  # data across processes: each process holds every expert


def test_missing_peer_is_a_clear_bounded_error(tmp_path):
    start_t = time.time()
    p = start(0, 2, free_port(), tmp_path, timeout=5)  # process 1 never starts
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3, err[-2000:]
    assert "only 1 of 2 processes" in err and "within 5 s" in err and "missing process ids: [1]" in err
    assert time.time() - start_t < 90
