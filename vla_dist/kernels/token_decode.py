"""Compiled greedy decoding of discrete action tokens (OpenVLA-style) with a static KV cache.

The same tokens as `model.generate(..., do_sample=False, max_new_tokens=num_tokens)` with a logits
processor that masks every id outside `action_token_ids`, but:
- prefill once (one compiled graph: image tower + prompt, K/V written into preallocated buffers
  of length prompt + num_tokens);
- then `num_tokens - 1` fixed-shape single-token steps (one compiled graph, replayed; a CUDA graph
  on a GPU): the new token's K/V is written in place at its slot, attention runs over the whole
  buffer with a mask of the slots filled so far, so no shape ever changes;
- the argmax is taken over the 256 action-token logits only (a gather, not a full-vocab mask);
- de-tokenization (bin index -> bin center) and un-normalization run in a third compiled graph.

Recompilation policy: as `flow_decode` (batch padded to the next power of two, one compile per
(bucket, prompt length, dtype) key and graph). The KV buffers are allocated once per key and reused
by every call (static addresses, which CUDA graphs need).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vla_dist.kernels.flow_decode import (
    ShapeCompiled,
    attention_mask_for,
    bucket_batch,
    compile_options,
    pad_batch,
)

Unnormalize = Callable[[torch.Tensor], torch.Tensor]


def default_position_offset(model: torch.nn.Module) -> int:
    """What `generate` adds to position ids: PaliGemma's are 1-indexed there, others' 0-indexed."""
    return 1 if getattr(model.config, "model_type", "") == "paligemma" else 0


def generate_positions(attention_mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Prompt position ids as `generate` makes them: count of real tokens before each, pads 0."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0) + offset


@torch.no_grad()
def greedy_action_bins_reference(
    model: torch.nn.Module,
    action_token_ids: torch.Tensor,
    num_tokens: int,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager reference TokenDecoder must equal: transformers' forward with a DynamicCache, one
    token at a time, greedy over the action tokens; `generate`'s semantics (2D masks growing by one,
    positions continuing from the prompt's last). `position_ids`: the prompt's (e.g. a policy's
    prepare_prompt); None: as `generate` makes them. Returns bin indices [B, num_tokens]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = generate_positions(attention_mask, default_position_offset(model))
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, use_cache=True, logits_to_keep=1, **extra)
    ids = action_token_ids.to(input_ids.device)
    position, bins = position_ids[:, -1:], []
    for step in range(num_tokens):
        bins.append(out.logits[:, -1].index_select(-1, ids).argmax(-1))
        if step == num_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((input_ids.shape[0], 1))], dim=1)
        position = position + 1
        out = model(input_ids=ids[bins[-1]][:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return torch.stack(bins, dim=1)


class _StaticKV:
    """Stands in for a transformers Cache during decode steps (the layers only call `update`):
    writes the new token's K/V at slot `index` of preallocated buffers, returns the whole buffers."""

    is_initialized = True  # read by PaliGemma's forward: "not the first iteration", skip image masks

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor) -> None:
        self.keys, self.values, self.index = keys, values, index

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.index, key_states)
        values.index_copy_(2, self.index, value_states)
        return keys, values


class TokenDecoder:
    """Greedy action-token decoding restricted to `action_token_ids`, compiled.

    model: a transformers causal VLM (e.g. PaliGemmaForConditionalGeneration) whose forward takes
        input_ids, pixel_values, attention_mask (2D or 4D), position_ids, past_key_values.
    action_token_ids: LongTensor [256], the token id of bin k.
    bin_centers: [256] or [action_dim, 256] (token j of the output uses row j % action_dim).
    unnormalize: maps normalized actions [B, num_tokens // action_dim, action_dim] (or [B, num_tokens]
        when the action dim is unknown) to raw units; None returns normalized values.
    position_offset: used when a call gives no position_ids (see __call__); None: `generate`'s
        (1 for PaliGemma, whose positions are 1-indexed there, else 0).
    Call with input_ids, pixel_values, attention_mask, and optionally token_type_ids and position_ids
    (`decoder(**policy.prepare_prompt(inputs))`); returns [B, num_tokens]. Without token_type_ids the
    prompt attends causally; with them (0 = prefix) PaliGemma's prefix-LM mask, as transformers
    builds it. Without position_ids the prompt is numbered as `generate` does; either way generated
    tokens continue from the prompt's last position."""

    def __init__(
        self,
        model: torch.nn.Module,
        action_token_ids: torch.Tensor,
        bin_centers: torch.Tensor,
        num_tokens: int,
        unnormalize: Unnormalize | None = None,
        compile: bool = True,
        mode: str | None = None,
        action_dim: int | None = None,
        position_offset: int | None = None,
    ) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        self.model = model.eval()
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.num_tokens = num_tokens
        self.action_token_ids = action_token_ids.to(self.device, torch.long)
        centers = bin_centers.to(self.device, torch.float32)
        self.action_dim = action_dim or (centers.shape[0] if centers.ndim == 2 else None)
        if self.action_dim is not None and num_tokens % self.action_dim:
            raise ValueError(f"num_tokens {num_tokens} is not a multiple of the action dim {self.action_dim}")
        # One row of centers per output token, so de-tokenization is a single gather.
        rows = torch.arange(num_tokens, device=self.device) % centers.shape[0] if centers.ndim == 2 else None
        self.token_centers = centers[rows] if rows is not None else centers.expand(num_tokens, -1)
        self.unnormalize = unnormalize
        self.position_offset = default_position_offset(model) if position_offset is None else position_offset
        text_config = model.config.get_text_config()
        self._attn_impl = text_config._attn_implementation
        self._kv_shape = (
            text_config.num_hidden_layers,
            text_config.num_key_value_heads,
            getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads,
        )
        self.compile_options = compile_options(mode, self.device)
        self.bucketed = compile
        self._prefill_fn = ShapeCompiled(self._prefill, compile, self.compile_options)
        self._step_fn = ShapeCompiled(self._step, compile, self.compile_options)
        # De-tokenize + un-normalize: `unnormalize` is the caller's code and may not trace whole.
        self._finish_fn = ShapeCompiled(self._finish, compile, self.compile_options, fullgraph=False)
        self._buffers: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def num_compiles(self) -> int:
        return self._prefill_fn.num_compiles + self._step_fn.num_compiles + self._finish_fn.num_compiles

    @property
    def compile_seconds(self) -> float:
        return self._prefill_fn.compile_seconds + self._step_fn.compile_seconds + self._finish_fn.compile_seconds

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, prompt_len = input_ids.shape
        size = bucket_batch(batch) if self.bucketed else batch
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = pad_batch(input_ids.to(self.device), size)
        pixel_values = _pad_images(pixel_values.to(self.device, self.dtype), batch, size)
        attention_mask = pad_batch(attention_mask.to(self.device), size)
        if token_type_ids is not None:
            token_type_ids = pad_batch(token_type_ids.to(self.device), size)
        keys, values = self._kv_buffers(size, prompt_len)

        if position_ids is None:
            prompt_pos = generate_positions(attention_mask, self.position_offset)
        else:
            prompt_pos = pad_batch(position_ids.to(self.device), size)
        first_gen_pos = prompt_pos[:, -1] + 1
        valid = torch.zeros(size, prompt_len + self.num_tokens, dtype=torch.bool, device=self.device)
        valid[:, :prompt_len] = attention_mask.bool()

        # Clones: under CUDA graphs a graph's outputs are only valid until the next replay starts.
        first = self._prefill_fn(input_ids, pixel_values, attention_mask, prompt_pos, token_type_ids, keys, values)
        bins = [first.clone()]
        slots = torch.arange(prompt_len, prompt_len + self.num_tokens, device=self.device)
        for i in range(self.num_tokens - 1):
            bins.append(self._step_fn(bins[-1], slots[i : i + 1], first_gen_pos, valid, keys, values).clone())
        actions = self._finish_fn(torch.stack(bins, dim=1))
        return actions[:batch].clone() if self._finish_fn.cuda_graphs else actions[:batch]

    def _kv_buffers(self, size: int, prompt_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        key = (size, prompt_len)
        if key not in self._buffers:
            layers, kv_heads, head_dim = self._kv_shape
            shape = (size, kv_heads, prompt_len + self.num_tokens, head_dim)
            keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
            values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)]
            for buffer in keys + values:
                # Fixed data pointers: CUDA graphs then update them in place instead of copying them.
                torch._dynamo.mark_static_address(buffer)
            self._buffers[key] = (keys, values)
        return self._buffers[key]

    def _greedy_bin(self, logits: torch.Tensor) -> torch.Tensor:
        """Index (0..255) of the most likely action token at the last position."""
        return logits[:, -1, :].index_select(-1, self.action_token_ids).argmax(-1)

    def _prefill(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        if token_type_ids is None:
            # A causal prompt, as an explicit mask. Left to transformers, PaliGemma's prompt is causal
            # when the batch has padding but fully bidirectional in eager mode when it has none (its
            # sdpa "is_causal" shortcut meets use_bidirectional_attention=True), and causal when
            # compiled: results would depend on the batch's padding and on compile.
            mask: dict[str, torch.Tensor] = {"attention_mask": self._causal_prompt_mask(attention_mask)}
        else:  # prefix-LM (token type 0 = bidirectional prefix): transformers builds that mask itself
            mask = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **mask,
        )
        prompt_len = input_ids.shape[1]
        for layer, k, v in zip(out.past_key_values.layers, keys, values, strict=True):
            k[:, :, :prompt_len].copy_(layer.keys)
            v[:, :, :prompt_len].copy_(layer.values)
        return self._greedy_bin(out.logits)

    def _causal_prompt_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        length = attention_mask.shape[1]
        position = torch.arange(length, device=attention_mask.device)
        causal = position[None, :] <= position[:, None]  # [query, key]
        # Each token also sees itself, so a padding row never has all keys masked (NaN-free K/V).
        itself = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
        allowed = (causal[None] & attention_mask.bool()[:, None, :]) | itself
        return attention_mask_for(allowed, self._attn_impl, self.dtype)

    def _step(
        self,
        prev_bin: torch.Tensor,
        slot: torch.Tensor,
        first_gen_pos: torch.Tensor,
        valid: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        prompt_len = valid.shape[1] - self.num_tokens
        # Slots filled so far: the valid prompt tokens and the generated ones up to this token's slot.
        filled = torch.arange(valid.shape[1], device=valid.device)
        valid_now = valid | ((filled >= prompt_len) & (filled <= slot))
        out = self.model(
            input_ids=self.action_token_ids[prev_bin][:, None],
            attention_mask=attention_mask_for(valid_now, self._attn_impl, self.dtype),
            position_ids=(first_gen_pos + (slot - prompt_len))[:, None],
            past_key_values=_StaticKV(keys, values, slot),
            use_cache=True,
        )
        return self._greedy_bin(out.logits)

    def _finish(self, bins: torch.Tensor) -> torch.Tensor:
        token = torch.arange(self.num_tokens, device=bins.device)
        normalized = self.token_centers[token[None, :], bins]
        if self.unnormalize is None:
            return normalized
        batch = bins.shape[0]
        if self.action_dim is None:
            return self.unnormalize(normalized)
        raw = self.unnormalize(normalized.reshape(batch, -1, self.action_dim))
        return raw.reshape(batch, self.num_tokens)


def _pad_images(pixel_values: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """Pad images to `size` samples: PaliGemma-style towers take several cameras per sample as
    consecutive rows ([B * n_cam, 3, H, W]), so the last sample's rows are repeated as a group."""
    per_sample, remainder = divmod(pixel_values.shape[0], batch)
    if remainder:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, not a multiple of the batch {batch}")
    grouped = pixel_values.reshape(batch, per_sample, *pixel_values.shape[1:])
    return pad_batch(grouped, size).reshape(size * per_sample, *pixel_values.shape[1:])
