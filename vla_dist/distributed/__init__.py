"""Ray trainer groups (torchrun-like actors), rendezvous, and the DeepSpeed config built from ours.
Models know nothing of this package; it wraps them."""

from vla_dist.config.train_checks import global_batch_size
from vla_dist.distributed.ds_config import build_ds_config
from vla_dist.distributed.group import TrainerGroup, rank_env

__all__ = ["TrainerGroup", "build_ds_config", "global_batch_size", "rank_env"]
