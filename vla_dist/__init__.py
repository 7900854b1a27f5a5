"""vla-dist: distributed post-training of Vision-Language-Action robot models."""

__version__ = "0.1.0"
