"""Process start-up: emulated CPU devices (:func:`emulate_cpu_devices`), and multi-process
(multi-host) ``jax.distributed`` with bounded waiting and clear errors.

On CPU the cross-process collectives go through gloo (``jax_cpu_collectives_implementation``);
on GPU/TPU JAX picks the platform's own. Every process runs the same program; a mesh built after
:func:`initialize` (e.g. :func:`moe_relayfree.make_ep_mesh`) spans the devices of all processes.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax

DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def emulate_cpu_devices(count: int) -> None:
    """Asks XLA:CPU for ``count`` devices (``XLA_FLAGS``) unless the caller's flags already
    name a count; other platforms ignore it. Call before the first use of a JAX backend
    (importing JAX is fine): after it the flag would be silently ignored, so that raises."""
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        return
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise RuntimeError(f"emulate_cpu_devices({count}): JAX backends already started; "
                               "call it before the first jax.devices() or computation")
    os.environ["XLA_FLAGS"] = f"{flags} --{DEVICE_COUNT_FLAG}={count}".strip()


class DistributedInitError(RuntimeError):
    pass


def _rendezvous(host: str, port: int, num_processes: int, process_id: int, timeout_s: float) -> None:
    """All processes meet on ``host:port`` before JAX's coordination service starts: that
    service aborts the whole process (SIGABRT) when a peer is missing, which no caller can
    catch, so the missing peer is detected here first and reported as an exception."""
    deadline = time.monotonic() + timeout_s
    job = f"{num_processes} processes at {host}:{port}"
    if process_id == 0:
        with socket.create_server((host, port)) as server:
            arrived: dict[int, socket.socket] = {}
            while len(arrived) < num_processes - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(1, num_processes)) - set(arrived))
                    for c in arrived.values():
                        c.close()
                    raise DistributedInitError(
                        f"process 0 of {num_processes} could not start the job: only "
                        f"{len(arrived) + 1} of {job} arrived within {timeout_s} s "
                        f"(missing process ids: {missing})")
                server.settimeout(remaining)
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                arrived[int(conn.recv(16).decode())] = conn
            for conn in arrived.values():
                conn.sendall(b"go")
                conn.close()
        return
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0) as conn:
                conn.sendall(str(process_id).encode())
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                if conn.recv(2) == b"go":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DistributedInitError(
                f"process {process_id} of {num_processes} could not join the job: process 0 at "
                f"{host}:{port} did not gather all {job} within {timeout_s} s")
        time.sleep(0.2)


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               timeout_s: int = 60, cpu_collectives: str = "gloo") -> None:
    """Joins the job. Raises :class:`DistributedInitError` naming the job if the peers do not all
    arrive within ``timeout_s`` seconds (a missing peer never hangs or aborts the caller).

    Process 0 also listens on the port after the coordinator's for the start-up rendezvous.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes > 1:
        _rendezvous(host, int(port) + 1, num_processes, process_id, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id, initialization_timeout=timeout_s,
        )
    except Exception as e:  # JAX raises several types here (XlaRuntimeError, RuntimeError, ...)
        raise DistributedInitError(
            f"process {process_id} of {num_processes} could not join the job at "
            f"{coordinator_address} within {timeout_s} s: a peer never arrived or the coordinator "
            f"is unreachable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def shutdown() -> None:
    jax.distributed.shutdown()
