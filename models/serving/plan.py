"""Each engine step's plan, from the process that schedules to every process of a
``jax.distributed`` job.

One process (0) runs the scheduler and the HTTP server; every process must run the same step
programs in the same order, with the same inputs, or their collectives never meet. No process
decides alone: process 0 sends each step's plan (what to run: a step of a given shape with its
packed inputs, or stop) and the others run exactly that (:meth:`Engine.follow
<moe_relayfree_models.serving.engine.Engine.follow>`).

The plan travels through the job's coordination service (the key-value store
``jax.distributed`` starts in process 0), one key per step: a process waiting for work must
wait as long as no request comes, and a device broadcast cannot (gloo gives up on a collective
whose peers have not all arrived after 30 s). That store has no public Python API in JAX 0.10;
``jax._src.distributed.global_state.client`` is what ``jax.distributed`` itself uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STEP, STOP = 1, 2
_HEADER = 5  # kind, D, C, Q, P
_PREFIX = "moe_relayfree/step_plan/"


@dataclasses.dataclass(frozen=True)
class Plan:
    """kind: :data:`STEP` or :data:`STOP`; shape: the step's ``(D, C, Q, P)``; packed: its
    inputs (``[length] int32``, see ``step.pack_sizes``)."""

    kind: int
    shape: tuple[int, int, int, int] = (0, 0, 0, 0)
    packed: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        header = np.array((self.kind, *self.shape), np.int32)
        body = np.zeros(0, np.int32) if self.packed is None else self.packed.astype(np.int32)
        return header.tobytes() + body.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Plan":
        ints = np.frombuffer(data, np.int32)
        kind, *shape = (int(v) for v in ints[:_HEADER])
        if kind not in (STEP, STOP):
            raise RuntimeError(f"internal: an unknown step plan kind {kind}")
        return cls(kind, tuple(shape), ints[_HEADER:].copy())


class PlanChannel:
    """Sends (process 0) and receives (the others) the :class:`Plan` of each step, in order."""

    def __init__(self, poll_s: float = 30.0):
        from jax._src import distributed

        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError("a PlanChannel needs jax.distributed to be initialized")
        self._sent = self._received = 0
        self._poll_ms = int(poll_s * 1000)

    def send(self, plan: Plan) -> None:
        self._client.key_value_set_bytes(f"{_PREFIX}{self._sent}", plan.to_bytes())
        # every process has read plan n - 2: it has run step n - 2 with this one (collectives)
        if self._sent >= 2:
            self._client.key_value_delete(f"{_PREFIX}{self._sent - 2}")
        self._sent += 1

    def receive(self) -> Plan:
        """The next plan; waits as long as it takes (process 0 may have nothing to do)."""
        key = f"{_PREFIX}{self._received}"
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, self._poll_ms)
                break
            except Exception as e:  # a timeout: no step yet; anything else ends the job
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._received += 1
        return Plan.from_bytes(data)


__all__ = ["Plan", "PlanChannel", "STEP", "STOP"]
