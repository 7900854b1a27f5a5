"""Compiled flow-matching action decoding for transformers' PI0 with a static prefix cache.

`PI0ForConditionalGeneration.sample_actions` runs the VLM prefix once, then each Euler step runs the
action expert over [state token, chunk tokens] against a DynamicCache that grows by 1 + chunk
tokens and is cropped back afterwards. `FlowDecoder` computes the same actions but:
- the prefix K/V (VLM tokens + the state token) is computed once and then frozen: the state token
  only attends to the prefix and itself (PI0's block mask), so its K/V is the same at every step and
  the loop processes the chunk tokens alone;
- each step attends over cat(frozen prefix K/V, chunk K/V): fixed shapes, no cache growth or crop;
- the mask and rotary position embeddings of the suffix are built once per call, not per step;
- prefix + all `num_steps` steps are one torch.compile graph (fullgraph=True: a graph break is an
  error, not a silent slowdown), replayed as a CUDA graph ("reduce-overhead") on a GPU and run
  through inductor's C++ wrapper on a CPU (see `compile_options`).

Recompilation policy (shared with `token_decode`): compiled graphs are static-shape
(`dynamic=False`); the batch is padded up to the next power of two (1, 2, 4, 8, ...) by repeating
the last row, and the pad rows are dropped from the result. A process compiles each decoder at most
once per (bucket, prompt length, dtype) key, so serving batch sizes 1..64 costs at most 7 compiles;
within a bucket every batch size reuses the same graph (and CUDA graph).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Dynamo keeps every compiled variant of a function on its code object, 8 by default; our callers
# compile one variant per shape key on purpose, so the limit is raised while a new key compiles.
RECOMPILE_LIMIT = 64


# ---- shared by FlowDecoder and TokenDecoder ------------------------------------------------------


def bucket_batch(batch: int) -> int:
    """The padded batch size a compiled decoder runs: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` with rows appended (copies of its last row) up to `size` rows: real, finite inputs
    keep pad rows from producing NaNs (an all-masked attention row would)."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])], dim=0)


def compile_options(mode: str | None, device: torch.device) -> dict[str, Any]:
    """torch.compile's mode/options. mode=None picks per device: CUDA graphs ("reduce-overhead") on a
    GPU; on a CPU inductor's C++ wrapper, which calls the kernels from C++ instead of Python (about
    half the latency of a tiny model at batch 1, same compile time). "default": inductor's defaults."""
    if mode is None:
        return {"mode": "reduce-overhead"} if device.type == "cuda" else {"options": {"cpp_wrapper": True}}
    return {} if mode == "default" else {"mode": mode}


def attention_mask_for(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask from a bool "may attend": [B, K] (every query sees the same keys) or [B, Q, K], in
    the format transformers' attention functions expect: bool for sdpa, additive for eager. A 4D mask
    is used as given by transformers (no mask-building heuristics in between)."""
    mask = (allowed[:, None, None, :] if allowed.ndim == 2 else allowed[:, None]).bool()
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    raise NotImplementedError(f"attention implementation {attn_implementation!r}: use 'sdpa' or 'eager'")


class ShapeCompiled:
    """`fn` compiled with static shapes, called with batch-padded arguments.

    Remembers the shape keys it has compiled (`num_compiles`, `compile_seconds` for the first call of
    each key, which includes tracing, inductor and, on a GPU, CUDA-graph recording)."""

    def __init__(self, fn: Callable[..., Any], compile: bool, options: dict[str, Any], fullgraph: bool = True) -> None:
        self.compiled = compile
        self.cuda_graphs = compile and options.get("mode") in CUDA_GRAPH_MODES
        self._fn = torch.compile(fn, fullgraph=fullgraph, dynamic=False, **options) if compile else fn
        self.keys: set[tuple[Any, ...]] = set()
        self.compile_seconds = 0.0

    @property
    def num_compiles(self) -> int:
        return len(self.keys) if self.compiled else 0

    def __call__(self, *args: Any) -> Any:
        if self.cuda_graphs:
            # Each call is a new step for CUDA-graph trees: outputs of the last replay may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        if not self.compiled:
            return self._fn(*args)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tree_leaves(args) if isinstance(t, torch.Tensor))
        if key in self.keys:
            return self._fn(*args)
        started = time.perf_counter()
        limits = {"recompile_limit": RECOMPILE_LIMIT, "accumulated_recompile_limit": 4 * RECOMPILE_LIMIT}
        with torch._dynamo.config.patch(**limits):
            out = self._fn(*args)
        self.compile_seconds += time.perf_counter() - started
        self.keys.add(key)
        return out


# ---- pi0 ---------------------------------------------------------------------------------------


class _FrozenPrefixKV:
    """Stands in for a transformers Cache inside the action expert's layers (they only call
    `update`): new tokens attend over [prefix K/V, their own K/V]; nothing is stored unless
    `record` is set (used once, to capture the state token's K/V)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], record: bool = False) -> None:
        self.keys, self.values, self.record = keys, values, record
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record:
            self.new_keys.append(key_states)
            self.new_values.append(value_states)
        keys = torch.cat([self.keys[layer_idx], key_states], dim=-2)
        values = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return keys, values


class FlowDecoder:
    """`model.sample_actions` (same noise, same result within float tolerance), compiled.

    Call with the prefix inputs and `noise` [B, chunk, max_action_dim]; returns the denoised actions
    [B, chunk, max_action_dim] in the model's normalized, padded action space. Floating inputs are
    cast to the model's dtype (bf16 models take fp32 inputs)."""

    def __init__(self, model: torch.nn.Module, num_steps: int, compile: bool = True, mode: str | None = None) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.model = model.eval()
        self.num_steps = num_steps
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.compile_options = compile_options(mode, self.device)
        self.bucketed = compile
        self._decode_fn = ShapeCompiled(self._decode, compile, self.compile_options)

    @property
    def num_compiles(self) -> int:
        return self._decode_fn.num_compiles

    @property
    def compile_seconds(self) -> float:
        return self._decode_fn.compile_seconds

    @torch.no_grad()
    def __call__(
        self,
        state: torch.Tensor,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        batch = state.shape[0]
        size = bucket_batch(batch) if self.bucketed else batch
        inputs = (  # _decode's order
            state.to(self.device, self.dtype),
            input_ids.to(self.device),
            pixel_values.to(self.device, self.dtype),
            pixel_attention_mask.to(self.device, torch.bool),
            attention_mask.to(self.device),
            noise.to(self.device, self.dtype),
        )
        actions = self._decode_fn(*(pad_batch(t, size) for t in inputs))
        # Clone: with CUDA graphs the output lives in the graph's memory pool, reused by the next call.
        return actions[:batch].clone() if self._decode_fn.cuda_graphs else actions[:batch]

    def _decode(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The compiled graph: `__call__`'s arguments, in its order, cast and batch-padded."""
        state, input_ids, pixel_values, pixel_attention_mask, attention_mask, noise = inputs
        model = self.model
        inner, dit = model.model, model.model.dit
        layers = dit.layers[: dit.config.num_hidden_layers]
        attn_impl = dit.config._attn_implementation
        batch, chunk = noise.shape[0], noise.shape[1]

        # 1. The VLM prefix, exactly as sample_actions runs it.
        position_ids = attention_mask.cumsum(-1) - 1
        prefix_embeds = inner.embed_prefix(input_ids, pixel_values, pixel_attention_mask)
        token_type_ids = torch.zeros_like(prefix_embeds)[:, :, 0]
        cache = inner.vlm(
            inputs_embeds=prefix_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            use_cache=True,
        ).past_key_values
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]

        # 2. Suffix positions and mask: PI0 numbers the suffix after the valid prefix tokens; every
        # suffix token may attend to all valid prefix tokens, the state token and (for chunk tokens)
        # the whole chunk, so "key is valid" is the whole mask.
        suffix_ones = torch.ones(batch, 1 + chunk, dtype=attention_mask.dtype, device=attention_mask.device)
        full_mask = torch.cat([attention_mask, suffix_ones], dim=1)
        suffix_pos = (full_mask.cumsum(-1) - 1)[:, -(1 + chunk) :]
        state_hidden = model.embed_action_time.state_proj(state)[:, None, :]
        cos, sin = dit.rotary_emb(state_hidden, suffix_pos)

        # 3. The state token once: its K/V joins the frozen prefix.
        prefix_len = keys[0].shape[-2]
        recorder = _FrozenPrefixKV(keys, values, record=True)
        state_mask = attention_mask_for(full_mask[:, : prefix_len + 1], attn_impl, state_hidden.dtype)
        hidden = state_hidden
        for layer in layers:
            hidden = layer(hidden, attention_mask=state_mask, position_embeddings=(cos[:, :1], sin[:, :1]),
                           past_key_values=recorder)
        frozen = _FrozenPrefixKV(
            [torch.cat([k, nk], dim=-2) for k, nk in zip(keys, recorder.new_keys, strict=True)],
            [torch.cat([v, nv], dim=-2) for v, nv in zip(values, recorder.new_values, strict=True)],
        )

        # 4. Euler steps from t=1 to t=0, unrolled into the graph.
        chunk_mask = attention_mask_for(full_mask, attn_impl, state_hidden.dtype)
        chunk_rope = (cos[:, 1:], sin[:, 1:])
        embed = model.embed_action_time
        dt = -1.0 / self.num_steps
        x = noise
        for step in range(self.num_steps):
            time_tensor = torch.full((batch,), 1.0 + step * dt, dtype=torch.float32, device=x.device)
            action_embeds = embed.action_in_proj(x)
            time_embeds = embed.sinusoid_embeds(time_tensor)[:, None, :]
            time_embeds = time_embeds.expand_as(action_embeds).to(action_embeds.dtype)
            hidden = embed.action_time_mlp_in(torch.cat([action_embeds, time_embeds], dim=2))
            hidden = embed.action_time_mlp_out(F.silu(hidden))
            for layer in layers:
                hidden = layer(hidden, attention_mask=chunk_mask, position_embeddings=chunk_rope,
                               past_key_values=frozen)
            x = x + dt * model.action_out_proj(dit.norm(hidden))
        return x
