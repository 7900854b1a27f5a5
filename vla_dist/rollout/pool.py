"""A fault-tolerant pool of Ray `SimActor`s that works through chunks of episodes.

Ray restarts a dead actor (killed, OOM, segfault) up to `max_restarts` times and rebuilds its scene;
the pool re-queues the chunk the actor was running so another actor (or the restarted one) redoes
it. Results are handed back per chunk; the caller decides what to keep, which is how collection
stays exact and duplicate-free whatever dies.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from vla_dist.cluster.placement import ActorPlacement, check_fits
from vla_dist.config.schema import CollectSection
from vla_dist.errors import VlaDistError, error_line
from vla_dist.rollout.actor import ChunkResult, SimActor
from vla_dist.rollout.runner import EpisodeRequest

log = logging.getLogger("vla_dist.rollout")

MAX_CHUNK_ATTEMPTS = 3  # a chunk that kills or crashes its actor this often is a bug, not bad luck
INFLIGHT_PER_ACTOR = 2  # one running, one queued, so an actor never waits on the driver
PROBE_INTERVAL_S = 1.0  # between checks whether a restarting actor is back


@dataclass
class PoolStats:
    chunks_done: int = 0
    chunks_retried: int = 0
    actor_failures: int = 0
    actors_lost: int = 0  # actors that used up their restarts
    failures: list[str] = field(default_factory=list)


class SimActorPool:
    def __init__(
        self,
        num_actors: int,
        actor_kwargs: dict[str, object],
        placement: ActorPlacement | None = None,
        max_restarts: int = 3,
    ) -> None:
        """`placement`: what each actor reserves (cluster/placement.py), used as given; None: one CPU."""
        from vla_dist.runtime import announce_sim_build

        announce_sim_build(compile_decoder=bool(getattr(actor_kwargs.get("policy"), "compile", False)))
        remote_cls = ray.remote(SimActor)
        self.max_restarts = max_restarts
        placement = placement or ActorPlacement()
        check_fits(placement, num_actors, ray.cluster_resources())  # a missing "sim" resource would hang
        self.actors = [
            remote_cls.options(**placement.ray_options(), max_restarts=max_restarts, max_task_retries=0)
            .remote(**actor_kwargs)
            for _ in range(num_actors)
        ]
        self.stats = PoolStats()
        # Called with an actor Ray has restarted, before it gets work again; returns an ObjectRef to
        # wait for. RL re-sends the current weights this way (a restarted actor holds none).
        self.restore: Callable[[Any], ray.ObjectRef] | None = None
        try:
            self.infos: list[dict[str, object]] = ray.get([actor.info.remote() for actor in self.actors])
        except (RayActorError, RayTaskError) as error:
            raise VlaDistError(f"sim actors failed to start (building the Genesis scene): {error}") from error

    @classmethod
    def from_config(cls, collect: CollectSection, actor_kwargs: dict[str, object]) -> SimActorPool:
        """A pool sized and placed by the `collect` section (actors, CPUs, memory, custom resources)."""
        return cls(collect.num_actors, actor_kwargs, ActorPlacement.from_collect(collect), collect.max_actor_restarts)

    def run(
        self,
        next_chunk: Callable[[], list[EpisodeRequest] | None],
        on_result: Callable[[list[EpisodeRequest], Any], None],
        method: str = "run_chunk",
        args: tuple[Any, ...] = (),
    ) -> PoolStats:
        """Pull chunks from `next_chunk` (None: nothing to hand out now) until it runs dry and nothing
        is in flight; deliver each finished chunk to `on_result` in completion order. Each chunk
        runs as `actor.<method>(chunk, *args)` (SimActor.run_chunk -> ChunkResult by default).

        An actor whose call fails with a `RayActorError` is taken out of rotation and probed with a
        cheap `info()` call until Ray has restarted it (calls to a restarting actor fail at once, so
        sending it work meanwhile would only burn the chunk's attempts).
        """
        retry: deque[list[EpisodeRequest]] = deque()
        attempts: dict[int, int] = {}  # first episode index of a chunk -> attempts so far
        work: dict[ray.ObjectRef, tuple[int, list[EpisodeRequest]]] = {}
        probes: dict[ray.ObjectRef, int] = {}
        next_probe = [0.0] * len(self.actors)
        load = [0] * len(self.actors)
        alive = set(range(len(self.actors)))
        ready = set(alive)

        def submit(actor_idx: int) -> bool:
            chunk = retry.popleft() if retry else next_chunk()
            if chunk is None:
                return False
            attempts[chunk[0].index] = attempts.get(chunk[0].index, 0) + 1
            work[getattr(self.actors[actor_idx], method).remote(chunk, *args)] = (actor_idx, chunk)
            load[actor_idx] += 1
            return True

        while True:
            for actor_idx in sorted(ready):
                while load[actor_idx] < INFLIGHT_PER_ACTOR and submit(actor_idx):
                    pass
            now = time.monotonic()
            for actor_idx in sorted(alive - ready):
                if actor_idx not in probes.values() and now >= next_probe[actor_idx]:
                    probes[self.actors[actor_idx].info.remote()] = actor_idx
            if not work and not retry and ready:  # a ready, idle actor asked for work and got none
                return self.stats
            pending = [*work, *probes]
            if not pending:  # every actor is restarting; wait for the next probe
                time.sleep(0.1)
                continue
            done, _ = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                if ref in probes:
                    actor_idx = probes.pop(ref)
                    try:
                        self.infos[actor_idx] = ray.get(ref)
                        if self.restore is not None:
                            ray.get(self.restore(self.actors[actor_idx]))
                        ready.add(actor_idx)
                    except ActorUnavailableError:  # still restarting
                        next_probe[actor_idx] = time.monotonic() + PROBE_INTERVAL_S
                    except RayActorError as error:  # restarts used up
                        alive.discard(actor_idx)
                        self.stats.actors_lost += 1
                        self._check_alive(alive, f"sim actor {actor_idx} is gone: {error_line(error)}")
                    continue
                actor_idx, chunk = work.pop(ref)
                load[actor_idx] -= 1
                try:
                    result = ray.get(ref)
                except (RayActorError, RayTaskError) as error:
                    retry.append(chunk)
                    self._on_failure(actor_idx, chunk, error, attempts, ready)
                    self._check_alive(alive, self.stats.failures[-1])
                    continue
                if isinstance(result, ChunkResult):
                    result.actor["actor_index"] = actor_idx
                self.stats.chunks_done += 1
                on_result(chunk, result)

    def _on_failure(
        self,
        actor_idx: int,
        chunk: list[EpisodeRequest],
        error: Exception,
        attempts: dict[int, int],
        ready: set[int],
    ) -> None:
        first, last = chunk[0].index, chunk[-1].index
        died = isinstance(error, RayActorError)
        what = "died" if died else "raised"
        message = f"sim actor {actor_idx} {what} on episodes {first}..{last}: {error_line(error)}"
        log.warning("%s; re-queuing the chunk", message)
        self.stats.failures.append(message)
        self.stats.chunks_retried += 1
        if died and actor_idx in ready:  # count each death once, not once per lost call
            ready.discard(actor_idx)
            self.stats.actor_failures += 1
        if isinstance(error, ActorUnavailableError):
            attempts[first] -= 1  # refused by a restarting actor: the chunk never ran
        if attempts[first] >= MAX_CHUNK_ATTEMPTS:
            raise VlaDistError(f"episodes {first}..{last} failed {attempts[first]} times; last: {message}")

    def _check_alive(self, alive: set[int], last: str) -> None:
        if not alive:
            raise VlaDistError(f"every sim actor died and used up its {self.max_restarts} restarts; last: {last}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)



