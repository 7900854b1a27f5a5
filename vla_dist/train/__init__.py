"""Supervised post-training (SFT) on a Ray trainer group with DeepSpeed ZeRO: `run_train(cfg)`."""

from vla_dist.train.sft import run_train

__all__ = ["run_train"]
