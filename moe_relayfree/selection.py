"""Choosing between the prefill and decode schedules by tokens per rank (calibrating the
threshold on a machine: :mod:`moe_relayfree.tools.calibration`)."""

from __future__ import annotations

from typing import Literal

from moe_relayfree.config import Schedule

# Tokens per rank at or below which "auto" picks the decode schedule, per platform (JAX's names:
# ``Device.platform`` says "gpu" where ``lax.platform_dependent`` says "cuda"/"rocm"; both are
# listed). CPU: from scripts/calibrate.py on 8 emulated devices; accelerators: both schedules
# compile to the same memory there, so this is a latency choice, not yet measured (DeepEP's
# low-latency kernels are built for 128). Where each comes from: docs/design.md, "Selection";
# calibrate per machine and model with moe_relayfree.tools.calibration.
DEFAULT_DECODE_THRESHOLDS: dict[str, int] = {
    "cpu": 1024,
    "gpu": 128,
    "cuda": 128,
    "rocm": 128,
    "tpu": 128,
}
# Platforms not in the table (PJRT plugins such as Ascend).
FALLBACK_DECODE_THRESHOLD = 128

_ALL = "*"
_overrides: dict[str, int] = {}


def set_decode_threshold(tokens_per_rank: int | None, platform: str | None = None) -> None:
    """Sets the process-wide auto threshold for ``platform`` (every platform when ``None``);
    ``tokens_per_rank=None`` restores the default(s)."""
    if tokens_per_rank is not None and tokens_per_rank < 0:
        raise ValueError("tokens_per_rank must be >= 0")
    key = _ALL if platform is None else platform
    if tokens_per_rank is None:
        if key == _ALL:
            _overrides.clear()
        else:
            _overrides.pop(key, None)
    else:
        _overrides[key] = int(tokens_per_rank)


def _default_platform() -> str:
    import jax

    return jax.default_backend()


def decode_threshold(platform: str | None = None) -> int:
    """The auto threshold in force for ``platform`` (default: JAX's default backend)."""
    platform = platform or _default_platform()
    for key in (platform, _ALL):
        if key in _overrides:
            return _overrides[key]
    return DEFAULT_DECODE_THRESHOLDS.get(platform, FALLBACK_DECODE_THRESHOLD)


def select_schedule(
    tokens_per_rank: int,
    schedule: Schedule = "auto",
    threshold: int | None = None,
    platform: str | None = None,
) -> Literal["prefill", "decode"]:
    """Resolves ``schedule``; "auto" picks decode when ``tokens_per_rank <= threshold``
    (default: :func:`decode_threshold` of ``platform``)."""
    if schedule in ("prefill", "decode"):
        return schedule
    if schedule != "auto":
        raise ValueError(f"schedule must be 'auto', 'prefill' or 'decode', got {schedule!r}")
    limit = decode_threshold(platform) if threshold is None else threshold
    return "decode" if tokens_per_rank <= limit else "prefill"
