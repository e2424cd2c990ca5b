"""Process set-up of a benchmark command: emulated CPU devices, how it was run, on what."""

from __future__ import annotations

import os
import platform
import sys
from typing import Sequence

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


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that reproduces this run: caller-set ``XLA_FLAGS`` (other than the
    device count this module sets), ``python scripts/<script>`` and the arguments
    (``argv=None``: ``sys.argv[1:]``)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if DEVICE_COUNT_FLAG not in f)
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(([f'XLA_FLAGS="{flags}"'] if flags else []) + [f"python scripts/{script}"] + args)


def machine() -> str:
    """``"<processor>, <n> cores"`` of this host."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
