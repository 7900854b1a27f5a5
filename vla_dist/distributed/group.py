"""A group of Ray actors that each look like a torchrun process.

    group = TrainerGroup(SFTWorker, placement, env={...})   # placement group, one bundle per rank
    group.get([actor.setup.remote(...) for actor in group.actors])   # every rank in ONE ray.get

Rank 0 is created first; its node address and a free port on it become MASTER_ADDR/MASTER_PORT for
every rank, with RANK/WORLD_SIZE/LOCAL_RANK (rank among the ranks on the same node). Ranks run with
max_restarts=0: a lost rank ends the job (the driver reports the last complete checkpoint and the
scheduler restarts with train.resume=auto).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from vla_dist.cluster.placement import TrainerPlacement, trainer_bundles
from vla_dist.errors import VlaDistError


def node_address_and_free_port() -> tuple[str, int, str]:
    """(IP, a free TCP port, node id) of the calling process' node; runs inside an actor."""
    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port, ray.get_runtime_context().get_node_id()


def rank_env(rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int) -> dict[str, str]:
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
            "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank), "LOCAL_SIZE": "",
            "CROSS_RANK": "0"}


class TrainerGroup:
    """`world_size` actors of `worker_cls` in a placement group; `rank_envs[i]` is rank i's torchrun env."""

    def __init__(self, worker_cls: type, placement: TrainerPlacement, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 300.0) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.placement = placement
        self.pg = placement_group(trainer_bundles(placement), strategy=placement.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise VlaDistError(f"the cluster could not place {placement.world_size} trainer ranks "
                               f"({trainer_bundles(placement)[0]} each, {placement.strategy}) within "
                               f"{ready_timeout_s:.0f} s: lower train.world_size or add nodes")
        remote_cls = ray.remote(worker_cls)
        self.actors: list[Any] = []
        for rank in range(placement.world_size):  # rank 0 first
            options = {
                "num_cpus": placement.cpus_per_rank, "num_gpus": placement.gpus_per_rank, "max_restarts": 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                "runtime_env": {"env_vars": dict(env or {})},
            }
            self.actors.append(remote_cls.options(**options).remote())
        where = self.get([actor.address_and_port.remote() for actor in self.actors])
        master_addr, master_port, _ = where[0]
        nodes: dict[str, int] = {}
        self.rank_envs = []
        for rank, (_, _, node) in enumerate(where):
            local_rank = nodes.get(node, 0)
            nodes[node] = local_rank + 1
            self.rank_envs.append(rank_env(rank, placement.world_size, local_rank, master_addr, master_port))
        for rank_env_ in self.rank_envs:
            rank_env_["LOCAL_SIZE"] = str(nodes[where[int(rank_env_["RANK"])][2]])

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def run(self, call: Callable[[Any, int], Any]) -> list[Any]:
        """`call(actor, rank)` -> ObjectRef for every rank, awaited together (collectives need that)."""
        return self.get([call(actor, rank) for rank, actor in enumerate(self.actors)])

    def get(self, refs: Sequence[Any], on_lost: str = "") -> list[Any]:
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(list(refs))
        except RayActorError as error:
            raise VlaDistError(f"a trainer rank died ({type(error).__name__}: {str(error).splitlines()[0]}). "
                               f"{on_lost}") from None

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        ray.util.remove_placement_group(self.pg)
