"""torch.compile'd action decoding for the two policy families.

- `FlowDecoder`: pi0 flow matching; the VLM prefix once, then the Euler denoise loop against a
  frozen (static) prefix K/V cache, prefix + loop compiled as one graph.
- `TokenDecoder`: OpenVLA-style greedy action tokens; prefill once, fixed-shape single-token steps
  on a preallocated KV cache, argmax over the 256 action tokens, de-tokenization, un-normalization.

Both compile static-shape graphs (CUDA graphs on a GPU) once per batch bucket (the next power of
two; see `bucket_batch`) and expose `num_compiles` / `compile_seconds`.
"""

from vla_dist.kernels.flow_decode import FlowDecoder, bucket_batch
from vla_dist.kernels.token_decode import TokenDecoder, greedy_action_bins_reference

__all__ = ["FlowDecoder", "TokenDecoder", "bucket_batch", "greedy_action_bins_reference"]
