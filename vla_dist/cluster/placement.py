"""What sim actors and trainer ranks ask Ray for, so a heterogeneous cluster places them right.

Sim actors ask for CPUs, optional memory, and custom resources such as {"sim": 1}: the cluster files
(SLURM, KubeRay, autoscaler) make CPU sim nodes advertise "sim" and GPU trainer nodes not, so
actors stay off the GPUs. Trainer ranks ask for CPUs, GPUs, optional memory and custom resources
(train.rank_resources, e.g. {"trainer": 1}) through one placement group bundle per rank
(`trainer_bundles`, used by distributed/group.py's TrainerGroup).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vla_dist.config.schema import CollectSection, TrainSection
from vla_dist.errors import ConfigError, VlaDistError

log = logging.getLogger("vla_dist.cluster")
GIB = 1024**3


@dataclass(frozen=True)
class ActorPlacement:
    """The Ray options one sim actor reserves."""

    num_cpus: float = 1.0
    memory_bytes: int = 0
    resources: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_collect(cls, collect: CollectSection) -> ActorPlacement:
        return cls(collect.cpus_per_actor, int(collect.memory_per_actor_gb * GIB), dict(collect.actor_resources))

    def ray_options(self) -> dict[str, object]:
        options: dict[str, object] = {"num_cpus": self.num_cpus, "resources": dict(self.resources)}
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        return options

    def demand(self, count: int) -> dict[str, float]:
        """Total of each resource `count` actors need, keyed by Ray's resource names."""
        total = {"CPU": self.num_cpus * count, **{k: v * count for k, v in self.resources.items()}}
        if self.memory_bytes:
            total["memory"] = float(self.memory_bytes * count)
        return total


def check_fits(placement: ActorPlacement, count: int, offered: dict[str, float]) -> None:
    """Fail fast when no node offers a custom resource the actors need (they would wait forever);
    warn when the cluster as a whole offers less than `count` actors need (some wait for capacity).

    `offered` is `ray.cluster_resources()`. An autoscaling cluster must keep at least one sim node
    (the rendered files set min replicas >= 1) so the resource exists from the start.
    """
    for name, amount in placement.resources.items():
        if offered.get(name, 0.0) < amount:
            raise VlaDistError(
                f"sim actors need {amount:g} of Ray resource {name!r} (collect.actor_resources) but the cluster offers "
                f"{offered.get(name, 0.0):g}: start sim nodes with --resources='{{\"{name}\": N}}' "
                "(cluster/ files do), "
                "or set collect.actor_resources={} to place actors on any node"
            )
    demand = placement.demand(count)
    short = {k: (need, offered.get(k, 0.0)) for k, need in demand.items() if offered.get(k, 0.0) < need}
    if short:
        details = ", ".join(f"{k} {have:g} of {need:g}" for k, (need, have) in short.items())
        log.warning("the cluster offers less than %d sim actors need (%s): the pool waits until Ray can place them all "
                    "(an autoscaler adds nodes; a fixed cluster needs fewer collect.num_actors)", count, details)


@dataclass(frozen=True)
class TrainerPlacement:
    """What each DeepSpeed rank reserves: one placement group bundle per rank.

    distributed/group.py's TrainerGroup creates `ray.util.placement_group(trainer_bundles(...),
    strategy=...)` and starts rank i in bundle i. PACK keeps ranks on as few nodes as possible (NCCL
    inside a node is fastest); STRICT_SPREAD puts one rank per node. `resources` (train.rank_resources,
    e.g. {"trainer": 1}) keeps ranks on the nodes that advertise it. A node lost during training stops
    the job with the last complete checkpoint kept: ranks run with max_restarts=0, the group turns a
    dead rank into a VlaDistError naming run.dir/checkpoints/<latest> at the time of the failure, and
    SLURM/KubeRay restart the job with train.resume=auto.
    """

    world_size: int
    gpus_per_rank: float = 1.0
    cpus_per_rank: float = 4.0
    memory_gb_per_rank: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {"trainer": 1} for a dedicated pool
    strategy: str = "PACK"

    @classmethod
    def from_train(cls, train: TrainSection) -> TrainerPlacement:
        return cls(train.world_size, train.gpus_per_rank, train.cpus_per_rank, train.memory_gb_per_rank,
                   dict(train.rank_resources), train.placement_strategy)


def trainer_bundles(placement: TrainerPlacement) -> list[dict[str, float]]:
    bundle: dict[str, float] = {"CPU": placement.cpus_per_rank, **placement.resources}
    if placement.gpus_per_rank:
        bundle["GPU"] = placement.gpus_per_rank
    if placement.memory_gb_per_rank:
        bundle["memory"] = placement.memory_gb_per_rank * GIB
    return [dict(bundle) for _ in range(placement.world_size)]


def check_rank_resources(placement: TrainerPlacement, nodes: list[dict[str, float]]) -> None:
    """Fail fast when no node offers a custom resource one rank needs: its bundle could never be
    placed and the group would only fail after its ready timeout. `nodes` is each alive node's
    resources (`ray.nodes()[i]["Resources"]`). Too few such nodes for all ranks only warns: an
    autoscaler may add them (it must keep at least one from the start, as for sim nodes).
    """
    for name, amount in placement.resources.items():
        best = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if best < amount:
            raise ConfigError("train.rank_resources", (
                f"each trainer rank needs {amount:g} of Ray resource {name!r} but no node offers it (at most "
                f"{best:g} on one node): start trainer nodes with --resources='{{\"{name}\": N}}', or set "
                "train.rank_resources={} to place ranks on any node"))
    if placement.resources:
        fits = sum(min(int(node.get(k, 0.0) // v) for k, v in placement.resources.items()) for node in nodes)
        if fits < placement.world_size:
            log.warning("the cluster's nodes offer train.rank_resources=%s for %d of %d trainer ranks: the group "
                        "waits for more nodes", placement.resources, fits, placement.world_size)
