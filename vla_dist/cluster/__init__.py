"""Multi-node: placement of sim actors and trainer ranks, cluster files (SLURM, KubeRay, Ray
autoscaler) rendered from the config, and Ray Jobs submission (`vla_dist.launch`).

Kept import-free: config validation imports `vla_dist.cluster.checks`, which must not load Ray.
"""
