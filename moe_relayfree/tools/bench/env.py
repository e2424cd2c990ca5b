"""Process set-up of a benchmark command: emulated CPU devices, how it was run, on what."""

from __future__ import annotations

import os
import platform
import sys
from typing import Sequence

from moe_relayfree.distributed import DEVICE_COUNT_FLAG, emulate_cpu_devices

__all__ = ["DEVICE_COUNT_FLAG", "command", "emulate_cpu_devices", "machine"]


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
