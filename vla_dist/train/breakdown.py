"""Where a training step's time goes (`train.breakdown`): our phases timed around the engine calls,
backward split by DeepSpeed's own `wall_clock_breakdown` timers.

Phases (milliseconds per optimizer step, summed over its micro-batches):
  data               drawing the micro-batch (fixed batches: EpisodeWindows; real training: the
                     WindowLoader hand-off and the ranks' agreement that each has a batch) + augmentation
  forward            the engine's forward (the policy's loss)
  nan_check          the ranks' agreement that every loss is finite (one scalar all_reduce per micro-batch)
  backward           the engine's backward, of which DeepSpeed's timers say
    backward_compute     autograd (with ZeRO-2/3's gradient hooks, which also reduce full buckets)
    gradient_reduction   the reduction after autograd (stage 0: bucketed all_reduce; 1-2: the
                         remaining buckets; 3: the epilogue of its hooks' reduce-scatters)
  step               the engine's step: grad norm and clipping, the optimizer, and at ZeRO-1/2 the
                     all-gather of the updated partitions
  other              the rest of the step's wall time (our bookkeeping between the calls)
The per-call metric collective (losses and window counts of every step, one all_gather per
`train()` call) is after the last step and outside every step's time.

On GPU each phase boundary synchronizes the device, which costs the overlap a real run has: the
breakdown is for finding where time goes, not for the fastest run (off by default).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# DeepSpeed's global engine timers (deepspeed/utils/timer.py), ms, summed over a step's micro-batches
DEEPSPEED_SPLIT = {"bwd_inner": "backward_compute", "bwd_allreduce": "gradient_reduction"}


class StepBreakdown:
    """Accumulates phase times for one optimizer step; `enabled=False` makes every call free."""

    def __init__(self, enabled: bool, synchronize: bool) -> None:
        self.enabled = enabled
        self.synchronize = synchronize
        self.ms: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.synchronize:
            import torch

            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] += (time.perf_counter() - started) * 1e3

    def finish(self, step_s: float, engine: Any) -> dict[str, float]:
        """The step's breakdown (ms) and a reset; DeepSpeed's timers split backward."""
        timers = engine.get_wall_clock_timers() or {}
        out = {name: round(value, 3) for name, value in self.ms.items()}
        for ds_name, name in DEEPSPEED_SPLIT.items():
            if ds_name in timers:
                out[name] = round(float(timers[ds_name]), 3)
        out["other"] = round(step_s * 1e3 - sum(self.ms.values()), 3)
        self.ms = defaultdict(float)
        return out
