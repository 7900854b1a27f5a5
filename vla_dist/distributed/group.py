"""A group of Ray actors that each look like a torchrun process.

    group = TrainerGroup(SFTWorker, placement, env={...})   # placement group, one bundle per rank
    group.get([actor.setup.remote(...) for actor in group.actors])   # every rank in ONE ray.get

Rank 0 is created first; its node address and a free port on it become MASTER_ADDR/MASTER_PORT for
every rank, with RANK/WORLD_SIZE/LOCAL_RANK (rank among the ranks on the same node); `rank_nodes`
keeps the Ray node id of each rank. Ranks run with max_restarts=0: a lost rank (its node died) ends
the job with a VlaDistError carrying the driver's `on_lost()` text (sft.py: the last complete
checkpoint, read when the rank is found dead), and the scheduler restarts with train.resume=auto.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from vla_dist.cluster.placement import GIB, TrainerPlacement, check_rank_resources, trainer_bundles
from vla_dist.errors import VlaDistError, error_line


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
    """`world_size` actors of `worker_cls` in a placement group; `rank_envs[i]` is rank i's torchrun env.

    `on_lost()` is called when a rank is found dead and its text ends the error (what was kept, how
    to resume): a callable, so it describes the state at the failure, not at the start.
    """

    # After a rank's task error, how long to wait for the other ranks' outcomes: a rank whose node
    # died may be reported by Ray only after its health checks fail (~15 s), while its peers fail at
    # once on the broken collective (gloo: connection closed). Only a lost rank (RayActorError) turns
    # the error into "rank lost"; when that is the first error, the others get just report_grace_s
    # (a peer blocked in a collective with a vanished node may not return for the gloo timeout).
    lost_grace_s: float = 60.0
    report_grace_s: float = 2.0

    def __init__(self, worker_cls: type, placement: TrainerPlacement, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 300.0, on_lost: Callable[[], str] | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.placement = placement
        self.on_lost = on_lost or (lambda: "")
        self.actors: list[Any] = []
        self.rank_nodes: list[str] = []  # Ray node id of each rank (report.json: rank_nodes)
        # A custom resource no node offers would only fail after ready_timeout_s: fail now, naming the key
        check_rank_resources(placement, [node["Resources"] for node in ray.nodes() if node["Alive"]])
        self.pg = placement_group(trainer_bundles(placement), strategy=placement.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.pg)
            raise VlaDistError(f"the cluster could not place {placement.world_size} trainer ranks "
                               f"({trainer_bundles(placement)[0]} each, {placement.strategy}) within "
                               f"{ready_timeout_s:.0f} s: lower train.world_size or add nodes")
        remote_cls = ray.remote(worker_cls)
        try:
            for rank in range(placement.world_size):  # rank 0 first
                options = {
                    "num_cpus": placement.cpus_per_rank, "num_gpus": placement.gpus_per_rank, "max_restarts": 0,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                    "runtime_env": {"env_vars": dict(env or {})},
                }
                if placement.memory_gb_per_rank:  # the bundle reserved it; the actor must claim it too
                    options["memory"] = int(placement.memory_gb_per_rank * GIB)
                self.actors.append(remote_cls.options(**options).remote())
            where = self.get([actor.address_and_port.remote() for actor in self.actors])
        except BaseException:
            self.shutdown()  # do not leave the placement group holding the cluster
            raise
        master_addr, master_port, _ = where[0]
        self.rank_nodes = [node for _, _, node in where]
        nodes: dict[str, int] = {}
        self.rank_envs = []
        for rank, node in enumerate(self.rank_nodes):
            local_rank = nodes.get(node, 0)
            nodes[node] = local_rank + 1
            self.rank_envs.append(rank_env(rank, placement.world_size, local_rank, master_addr, master_port))
        for rank, rank_env_ in enumerate(self.rank_envs):
            rank_env_["LOCAL_SIZE"] = str(nodes[self.rank_nodes[rank]])

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def run(self, call: Callable[[Any, int], Any]) -> list[Any]:
        """`call(actor, rank)` -> ObjectRef for every rank, awaited together (collectives need that)."""
        return self.get([call(actor, rank) for rank, actor in enumerate(self.actors)])

    def get(self, refs: Sequence[Any], on_lost: str | Callable[[], str] | None = None) -> list[Any]:
        """ray.get of the ranks' refs. A dead rank -> VlaDistError ending with `on_lost` (default:
        the group's `on_lost()`); any other error is re-raised as it is."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        refs = list(refs)
        try:
            return ray.get(refs)
        except (RayActorError, RayTaskError) as error:
            outcomes = self._outcomes(refs, error)
            dead = {who: e for who, e in outcomes.items() if isinstance(e, RayActorError)}
            if not dead:
                raise
            text = on_lost if isinstance(on_lost, str) else (on_lost or self.on_lost)()
            died = "; ".join(f"{who} was lost ({error_line(e)})" for who, e in dead.items())
            others = "; ".join(f"{who} failed ({error_line(e)})" for who, e in outcomes.items() if who not in dead)
            raise VlaDistError(f"trainer {died}{'; then ' + others if others else ''}. {text}".strip()) from None

    def _outcomes(self, refs: list[Any], first: Exception) -> dict[str, Exception]:
        """Every rank's error among `refs` that resolved within the grace period."""
        import ray
        from ray.exceptions import RayActorError, RayError

        grace = self.report_grace_s if isinstance(first, RayActorError) else self.lost_grace_s
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=grace)
        by_rank = len(refs) == len(self.actors)  # run() passes one ref per rank, in rank order
        outcomes: dict[str, Exception] = {}
        for index, ref in enumerate(refs):
            if ref not in ready:
                continue  # still blocked (e.g. in a collective with the dead rank): no outcome to report
            try:
                ray.get(ref, timeout=0)
            except RayError as error:
                outcomes[f"rank {index}" if by_rank else f"a rank ({index})"] = error
        return outcomes or {"a rank": first}

    # How long shutdown waits for the ranks to let go of their own processes before killing them.
    release_grace_s: float = 5.0

    def shutdown(self) -> None:
        import ray

        # Best effort: a rank that is busy (stuck in a collective after a peer failed) or dead does not
        # answer, and is killed anyway once the grace period is over.
        releasing = [actor.release.remote() for actor in self.actors if hasattr(actor, "release")]
        if releasing:
            ray.wait(releasing, num_returns=len(releasing), timeout=self.release_grace_s)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        ray.util.remove_placement_group(self.pg)


