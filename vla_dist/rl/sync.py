"""Weight sync from the trainer ranks to the rollout actors, versioned, bounded in time.

    sync = WeightSync(group, pool, lora, timeout_s)
    sync.push(version)        # ranks gather the trainable weights; rank 0 ray.put's them once;
                              # every sim actor loads them as `version` (acknowledged) or push fails
    pool.restore = sync.restore   # an actor Ray restarted gets the current version before any work

LoRA runs send the adapter only, full fine-tunes the gathered trainable weights (rl/worker.py). The
bytes travel through Ray's object store (one put, each actor's node fetches once); on a GPU cluster
a NCCL broadcast to GPU rollout workers would be faster, but vla-dist's rollout actors run the
policy on CPU beside the simulator, which the object store serves directly.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from vla_dist.config.schema import LoraSection
from vla_dist.errors import VlaDistError, error_line

RETRY_S = 1.0  # between attempts to reach an actor Ray is restarting


class WeightSync:
    def __init__(self, group: Any, pool: Any, lora: LoraSection | None, timeout_s: float) -> None:
        self.group, self.pool, self.lora, self.timeout_s = group, pool, lora, timeout_s
        self.version = -1
        self.ref: Any = None

    def push(self, version: int) -> dict[str, float]:
        """Gather on the ranks, then load on every actor as `version`. -> sync_bytes, sync_s
        (gather + every actor acknowledged), gather_s."""
        started = time.perf_counter()
        info = self.group.run(lambda a, r: a.weights.remote())[0]
        self.ref, self.version = info["ref"][0], version
        deadline = time.monotonic() + self.timeout_s
        actors = self.pool.actors
        pending = {i: actor.set_weights.remote(version, self.ref, self.lora) for i, actor in enumerate(actors)}
        while pending:
            for index, ref in list(pending.items()):
                try:
                    ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                    del pending[index]
                except GetTimeoutError:
                    raise VlaDistError(f"weight sync of version {version} to sim actor {index} not acknowledged "
                                       f"within rl.sync_timeout_s={self.timeout_s:g} s") from None
                except (ActorUnavailableError, RayActorError) as error:  # died or restarting: try again
                    if time.monotonic() > deadline:
                        raise VlaDistError(f"sim actor {index} did not come back for the weight sync of version "
                                           f"{version} within {self.timeout_s:g} s: {error_line(error)}") from None
                    time.sleep(RETRY_S)
                    pending[index] = self.pool.actors[index].set_weights.remote(version, self.ref, self.lora)
        return {"sync_bytes": float(info["bytes"]), "sync_s": time.perf_counter() - started,
                "gather_s": float(info["seconds"])}

    def restore(self, actor: Any) -> Any:
        """The pool's hook for an actor Ray restarted: the current version, before any work."""
        return actor.set_weights.remote(self.version, self.ref, self.lora)
