"""Wait until a Ray cluster has N live nodes, or fail naming what is missing.

Used by the SLURM script between `ray start` and the driver (a driver started early would place
sim actors on the first nodes only):

    python -m vla_dist.cluster.wait_nodes --address HEAD_IP:PORT --nodes 4 --timeout 300 \
        --expect "node001 node002 node003 node004"

Exit 0 when the nodes are up; 1 with one line on stderr when the timeout passes first.
"""

from __future__ import annotations

import argparse
import sys
import time


def live_nodes() -> list[dict[str, object]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def wait_for_nodes(
    address: str, nodes: int, timeout_s: float, expect: list[str] | None = None
) -> list[dict[str, object]]:
    """Connect to `address` (retrying while the head's GCS comes up) and poll until `nodes` are alive."""
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.is_initialized():
        try:
            ray.init(address=address, logging_level="error", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:  # GCS not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Ray head answered at {address} within {timeout_s:g} s: {error}") from error
            time.sleep(1.0)
    alive = live_nodes()
    while len(alive) < nodes:
        if time.monotonic() > deadline:
            seen = sorted(f"{n.get('NodeManagerHostname')}/{n.get('NodeManagerAddress')}" for n in alive)
            wanted = f"; allocation: {' '.join(expect)}" if expect else ""
            raise TimeoutError(f"only {len(alive)} of {nodes} Ray nodes joined {address} within {timeout_s:g} s "
                               f"(joined: {', '.join(seen) or 'none'}{wanted}); see the worker nodes' ray start output")
        time.sleep(1.0)
        alive = live_nodes()
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="HEAD_IP:PORT of the Ray GCS")
    parser.add_argument("--nodes", type=int, required=True, help="live nodes to wait for, head included")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--expect", default="", help="the allocation's node names, for the error message")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        alive = wait_for_nodes(args.address, args.nodes, args.timeout, args.expect.split() or None)
    except TimeoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    resources = {}
    for node in alive:
        for key, value in dict(node.get("Resources", {})).items():
            if not key.startswith("node:"):
                resources[key] = resources.get(key, 0.0) + float(value)
    shown = ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", "sim"))
    print(f"ray: {len(alive)} nodes up after {time.monotonic() - started:.1f} s ({shown})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
