"""Multi-node: placement of sim actors and trainer ranks, cluster files (SLURM, KubeRay, Ray
autoscaler) rendered from the config, and Ray Jobs submission (`vla_dist.launch`). The value rules
of the `cluster` section and the `collect` placement keys are config's (`config/cluster_checks.py`).
"""
