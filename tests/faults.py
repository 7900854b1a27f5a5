"""Faults injected into real training, from the tests only: SFTWorker subclasses that the tests hand
to `run_train(cfg, worker_cls=...)`, so production code carries no test switches.

- `nan_worker("3,4")`: the first micro-batch drawn at steps 3 and 4 has a non-finite loss;
  `nan_worker("5+")`: every micro-batch from step 5 on.
- `hold_save_worker(step, rank, seconds)`: that rank, in its save of checkpoint step_STEP, right
  after the engine's state is written (the other ranks go on and wait in the save's barrier),
  writes its pid to step_STEP/.hold_save_rankRANK.pid and sleeps: "kill -9 during a save" without
  a race against a sub-second save (tests/test_train_crash.py).

The classes are made inside functions, so Ray ships them to the actors by value (the actors need
not import this module). `python -m tests.faults hold-save STEP:RANK:SECONDS train KEY=VALUE...`
runs `vla-dist train` (the CLI itself, its messages and exit codes) with the holding worker.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

from vla_dist import atomic
from vla_dist.train.worker import SFTWorker


def nan_worker(spec: str) -> type[SFTWorker]:
    """An SFTWorker whose loss is non-finite where `spec` ("3,4", "5+", or both: "2,5+") says."""
    steps = {int(item) for item in spec.split(",") if item and not item.endswith("+")}
    from_step = min((int(item[:-1]) for item in spec.split(",") if item.endswith("+")), default=None)

    class SFTWorkerWithNaN(SFTWorker):
        _last_step: int | None = None

        def _loss(self, batch: Any) -> Any:
            loss = super()._loss(batch)
            step = int(self.engine.global_steps)  # the step being taken: global_steps moves after it
            first = step != self._last_step  # the first micro-batch drawn at this step
            self._last_step = step
            if (from_step is not None and step >= from_step) or (first and step in steps):
                loss = loss * float("nan")
            return loss

    return SFTWorkerWithNaN


def hold_save_worker(step: int, rank: int, seconds: float = 300.0) -> type[SFTWorker]:
    """An SFTWorker whose rank `rank` stops for `seconds` inside its save of step_`step`."""

    class SFTWorkerHoldingSave(SFTWorker):
        def _save_engine(self, path: Path) -> None:
            super()._save_engine(path)
            if path.name == f"step_{step}" and self.rank == rank:
                # whole or absent: the test reads it as soon as it exists
                atomic.write_text(path / f".hold_save_rank{rank}.pid", str(os.getpid()))
                time.sleep(seconds)

    return SFTWorkerHoldingSave


def main(argv: list[str]) -> int:
    """hold-save STEP:RANK:SECONDS, then `vla-dist` arguments: the CLI, its ranks holding that save."""
    import vla_dist.train
    from vla_dist.cli import main as cli_main
    from vla_dist.train.sft import run_train

    fault, spec, *rest = argv
    if fault != "hold-save":
        raise SystemExit(f"unknown fault {fault!r}")
    step, rank, seconds = spec.split(":")
    # the CLI imports run_train from vla_dist.train when it runs the command
    vla_dist.train.run_train = functools.partial(
        run_train, worker_cls=hold_save_worker(int(step), int(rank), float(seconds)))
    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
