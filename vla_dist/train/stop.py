"""Stop requests for the train driver: SIGUSR1 / SIGTERM mean "save a checkpoint now and stop".

Who sends them: the rendered SLURM script sends SIGUSR1 when the time limit nears
(`--signal=B:USR1@grace`), waits for the driver, then requeues the job, which restarts with
train.resume=auto. Kubernetes (pod deletion or eviction), `docker stop` and `ray job stop` send
SIGTERM, then SIGKILL after a grace period (30 s, 10 s, 3 s by default): the run saves only if its
one chunk of steps and the save fit in it (docs/multinode.md, "Stopping a training run").

    with StopRequest() as stop:       # in the main thread, after ray.init (it installs its own SIGTERM handler)
        while step < steps and not stop.requested:
            ...                        # a few steps; the handler only records the signal

The handler does nothing but record the first signal (a signal handler that saved would run in the
middle of whatever the driver was doing, e.g. inside a collective). A second signal while the driver
saves is reported and ignored, so it cannot abort the save it asked for. The previous handlers come
back on exit. Outside the main thread Python cannot install handlers: the request is then inert.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Self

from vla_dist.errors import VlaDistError

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """A context manager: while inside, SIGUSR1/SIGTERM set `signal_name` instead of ending the process."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, what: str = "vla-dist train") -> None:
        self.signals = signals
        self.what = what
        self.signal_name: str | None = None  # "SIGUSR1" / "SIGTERM": the first stop signal received
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python; the default is the closest we can restore
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            note = f"{self.what}: {name} received: saving a checkpoint after the current steps, then stopping\n"
        else:
            note = (f"{self.what}: {name} ignored: already stopping ({self.signal_name}), "
                    "the checkpoint is being saved\n")
        # os.write, not print: a handler can run in the middle of another print to the same stream
        os.write(2, note.encode())


class StoppedBySignal(VlaDistError):
    """The run stopped early on a SIGTERM, with its checkpoint saved: the CLI exits 1 so that whatever
    only sees the exit code (a Ray job -> RayJob FAILED and retried under backoffLimit, a Kubernetes Job,
    docker --restart=on-failure) treats the run as unfinished rather than as done."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report
