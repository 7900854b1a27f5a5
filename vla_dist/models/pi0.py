"""pi0: flow matching on transformers' `PI0ForConditionalGeneration` (PaliGemma backbone + a Gemma
action expert that attends to the backbone's KV cache).

Conventions (HF's): x_t = t * noise + (1 - t) * actions, the model predicts the velocity
noise - actions, and `sample_actions` integrates from t = 1 (noise) to t = 0 with
`num_inference_steps` Euler steps. Actions are normalized to [-1, 1] with q01/q99 and zero-padded
to `max_action_dim`; state is standardized and zero-padded to `max_state_dim`.

Padded action dims are exact zeros end to end: noise is zero there, the output projection's rows
for them are zeroed at init and the loss masks them (so they get no gradient and stay zero), hence
x_t and the predicted velocity are zero there in training and in sampling alike. Supervising them
instead (openpi's choice) spends capacity on dims we throw away.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vla_dist.errors import ConfigError
from vla_dist.models import processing
from vla_dist.models.files import PretrainedError
from vla_dist.models.foundation import editable, load_foundation
from vla_dist.models.policy import PolicyBatch, PolicyInputs, PolicySpec, VLAPolicy
from vla_dist.models.processing import Normalization

if TYPE_CHECKING:
    from vla_dist.config.schema import ModelSection

# LoRA on the language model and the expert, never the SigLIP tower (it has its own q/k/v/o
# projections). {last} is the backbone's last layer: only its k/v projections matter (see below).
_PROJ = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LORA_TARGETS = (
    r"model\.dit\.layers\.\d+\." + _PROJ
    + r"|model\.vlm\.language_model\.layers\.(?!{last}\.)\d+\." + _PROJ
    + r"|model\.vlm\.language_model\.layers\.{last}\.self_attn\.(k|v)_proj"
)
# The expert reads only the backbone's per-layer K/V cache: in its last layer everything after the
# k/v projections (q, o, MLP, norms) computes outputs pi0 discards, and the expert's copy of the
# vocabulary embedding is never read (the expert gets embeddings). Frozen at build, so optimizers
# and ZeRO's flat buffers carry no state for them (0.37B parameters at 3B size).
_DISCARDED_IN_LAST_LAYER = ("self_attn.q_proj.", "self_attn.o_proj.", "mlp.", "post_attention_layernorm.")
# Layers/KV heads/head_dim the expert must share with the backbone's text model: it attends to the
# backbone's KV cache layer by layer (a mismatch is not checked by transformers).
_SHARED_WITH_EXPERT = ("num_hidden_layers", "num_key_value_heads", "head_dim")


class PI0Policy(VLAPolicy):
    """Attributes beyond VLAPolicy's: max_state_dim, max_action_dim (the model's padded widths),
    image_token_id, tokens_per_image, prompt_length = n_cam * tokens_per_image + 1 + max_text_tokens."""

    family = "pi0"

    def __init__(self, hf_model: Any, tokenizer: Any, normalization: Normalization, spec: PolicySpec) -> None:
        super().__init__(hf_model, tokenizer, normalization, spec)
        config = hf_model.config
        self.max_state_dim, self.max_action_dim = config.max_state_dim, config.max_action_dim
        if spec.action_dim > self.max_action_dim or spec.state_dim > self.max_state_dim:
            raise ValueError(f"action/state dims {spec.action_dim}/{spec.state_dim} exceed the model's "
                             f"max_action_dim/max_state_dim {self.max_action_dim}/{self.max_state_dim}")
        if config.chunk_size != spec.chunk_size:
            raise ValueError(f"config.json chunk_size {config.chunk_size} != vla_dist.json {spec.chunk_size}")
        self.image_token_id = processing.token_id(tokenizer, processing.IMAGE)
        if config.vlm_config.image_token_id != self.image_token_id:
            raise ValueError(f"config image_token_id {config.vlm_config.image_token_id} is not the "
                             f"tokenizer's <image> id {self.image_token_id}")
        vision = config.vlm_config.vision_config
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.prompt_length = len(self.cameras) * self.tokens_per_image + 1 + spec.max_text_tokens
        self.backbone_layers = config.vlm_config.text_config.num_hidden_layers
        frozen = set(self.unused_parameters()) | set(self.discarded_parameters())
        for name, param in hf_model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)

    @classmethod
    def build(
        cls, model_cfg: ModelSection, spec: PolicySpec, normalization: Normalization, meta: bool = False
    ) -> PI0Policy:
        from transformers import PI0ForConditionalGeneration

        tokenizer = processing.build_tokenizer()
        config = pi0_config(model_cfg.hf, spec, tokenizer)
        with torch.device("meta" if meta else "cpu"):
            hf_model = PI0ForConditionalGeneration(config)
        policy = cls(hf_model, tokenizer, normalization, spec)
        if not meta:
            policy.zero_padded_action_rows()
        return policy

    @classmethod
    def from_foundation(cls, path: Path, spec: PolicySpec, normalization: Normalization) -> PI0Policy:
        """A plain transformers PI0 checkpoint (config.json + safetensors + tokenizer.json, as
        `PI0ForConditionalGeneration.save_pretrained` and the tokenizer's `save_pretrained` write
        them) as a policy for the dataset in `spec`/`normalization`: its chunk size and image size are
        the checkpoint's; actions and state are zero-padded to its max_action_dim/max_state_dim.
        The output rows of the padded action dims are zeroed (the module docstring's convention; the
        checkpoint's values there are never used). Loads on the CPU: whole, or partitioned inside a
        ZeRO-3 rank's `partitioned_loading`. Raises PretrainedError."""
        hf_model, tokenizer = load_foundation(path, spec)
        config = hf_model.config
        spec.chunk_size, spec.image_size = config.chunk_size, config.vlm_config.vision_config.image_size
        if spec.action_dim > config.max_action_dim or spec.state_dim > config.max_state_dim:
            raise PretrainedError(
                f"{path / 'config.json'}: the dataset's action/state dims {spec.action_dim}/{spec.state_dim} exceed "
                f"the checkpoint's max_action_dim/max_state_dim {config.max_action_dim}/{config.max_state_dim} "
                "(pi0 zero-pads actions and state up to these widths and cannot take wider ones)")
        try:
            policy = cls(hf_model, tokenizer, normalization, spec)
        except ValueError as error:  # no <image>/<bos>/<pad> token, image_token_id not the tokenizer's
            raise PretrainedError(f"{path}: {error}") from None
        policy.zero_padded_action_rows()
        return policy

    def retargeted(self, dataset: PolicySpec, normalization: Normalization) -> PI0Policy:
        """The same networks acting in the dataset's action space, with its statistics: the backbone,
        the action expert and the time/action projections keep their weights (pi0 pads every action
        space to max_action_dim, so the projections fit any space up to that width); the action dims
        take the new space's meaning and the padded rows are zeroed again. What the policy learned to
        see and attend to carries over; what its action rows mean is learned from the new data. Its
        architecture (chunk, image size, prompt length, dtype) stays its own; state inputs: the
        dataset spec's when given, else its own."""
        if dataset.cameras != self.spec.cameras:
            raise PretrainedError(f"the dataset's cameras {dataset.cameras} are not the policy's {self.spec.cameras}")
        if dataset.action_dim > self.max_action_dim or dataset.state_dim > self.max_state_dim:
            raise PretrainedError(f"the dataset's action/state dims {dataset.action_dim}/{dataset.state_dim} exceed "
                                  f"the policy's widths {self.max_action_dim}/{self.max_state_dim}")
        state_inputs = self.spec.state_inputs if dataset.state_inputs is None else dataset.state_inputs
        spec = replace(self.spec, action_dim=dataset.action_dim, state_dim=dataset.state_dim,
                       action_space=dataset.action_space, state_inputs=state_inputs)
        policy = PI0Policy(self.hf_model, self.tokenizer, normalization, spec)
        policy.zero_padded_action_rows()
        return policy

    def zero_padded_action_rows(self) -> None:
        """The output projection's rows for the padded action dims: exact zeros (module docstring)."""
        projection = self.hf_model.action_out_proj
        with torch.no_grad(), editable(projection.weight, projection.bias):
            self.hf_model.action_out_proj.weight[self.action_dim :].zero_()
            self.hf_model.action_out_proj.bias[self.action_dim :].zero_()

    def unused_parameters(self) -> list[str]:
        """Parameters no computation reads (frozen; left out of count_parameters(exclude_unused))."""
        return ["model.dit.embed_tokens.weight"]

    def discarded_parameters(self) -> list[str]:
        """Parameters computing outputs pi0 throws away (the backbone's last layer past its K/V); frozen."""
        last = f"model.vlm.language_model.layers.{self.backbone_layers - 1}."
        prefixes = tuple(last + part for part in _DISCARDED_IN_LAST_LAYER) + ("model.vlm.language_model.norm.",)
        return [name for name, _ in self.hf_model.named_parameters() if name.startswith(prefixes)]

    def lora_target_modules(self) -> list[str] | str:
        """A regex: every expert layer's projections, and the backbone's except the last layer's q/o/MLP
        (their outputs are discarded, an adapter there would never get a gradient)."""
        return self.spec.lora_targets or LORA_TARGETS.format(last=self.backbone_layers - 1)

    # --- inputs ------------------------------------------------------------------------------

    def prepare_prefix(self, inputs: PolicyInputs) -> dict[str, torch.Tensor]:
        """The static prefix `sample_actions`/`forward` take, normalized, on the model's device:
        state [B, max_state_dim] (model dtype; standardized, zero-padded),
        input_ids [B, prompt_length] long: n_cam*tokens_per_image <image>, <bos>, prompt, <pad>...,
        pixel_values [B, n_cam, 3, image_size, image_size] (model dtype, in [-1, 1]),
        pixel_attention_mask [B, n_cam] bool (all True), attention_mask [B, prompt_length] long.
        Shapes depend only on B: a compiled decoder sees one shape per batch size."""
        batch = self.check_inputs(inputs)
        device = self.device
        state = F.pad(self.normalize_state(inputs.state), (0, self.max_state_dim - self.state_dim))
        prefix = [self.image_token_id] * (len(self.cameras) * self.tokens_per_image) + [self.tokenizer.bos_token_id]
        input_ids, attention_mask = processing.pack_prompts(
            self.tokenizer, inputs.instructions, self.spec.max_text_tokens, prefix, self.prompt_length, left_pad=False
        )
        return {
            "state": state.to(device, self.dtype),
            "input_ids": input_ids.to(device),
            "pixel_values": self.pixel_values(inputs.images),
            "pixel_attention_mask": torch.ones((batch, len(self.cameras)), dtype=torch.bool, device=device),
            "attention_mask": attention_mask.to(device),
        }

    def make_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal [B, chunk, max_action_dim] float32 on the model's device, zero in the
        padded dims >= action_dim (what training saw)."""
        noise = torch.randn(batch, self.chunk_size, self.max_action_dim, generator=generator)
        noise[..., self.action_dim :] = 0
        return noise.to(self.device)

    def full_noise(self, noise: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Noise as the model takes it: given [B, chunk, A] or [B, chunk, max_action_dim] (padded dims
        are zeroed either way), else drawn; model dtype."""
        if noise is None:
            return self.make_noise(batch).to(self.dtype)
        if noise.shape[:2] != (batch, self.chunk_size) or noise.shape[2] not in (self.action_dim, self.max_action_dim):
            raise ValueError(f"noise must be [{batch}, {self.chunk_size}, {self.action_dim} or {self.max_action_dim}], "
                             f"got {tuple(noise.shape)}")
        noise = noise[..., : self.action_dim].to(self.device, torch.float32)
        noise = F.pad(noise, (0, self.max_action_dim - self.action_dim))
        return noise.to(self.dtype)

    def sample_timestep(self, batch: int) -> torch.Tensor:
        """float32 [B] flow-matching times, drawn as transformers' PI0 does (scaled Beta(1.5, 1))."""
        config = self.hf_model.config
        beta = torch.distributions.Beta(
            torch.tensor(config.time_sampling_beta_alpha), torch.tensor(config.time_sampling_beta_beta))
        time = beta.sample((batch,)) * config.time_sampling_scale + config.time_sampling_offset
        return time.float().to(self.device)

    # --- the interface -------------------------------------------------------------------------

    def per_sample_loss(self, batch: PolicyBatch, noise: torch.Tensor | None = None,
                        timestep: torch.Tensor | None = None,
                        prefix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """float32 [B]: flow-matching MSE per sample over valid steps and real action dims.
        `noise` ([B, chunk, A or max_action_dim]) and `timestep` ([B]) are drawn when not given;
        `prefix`: `prepare_prefix(batch)` already made (with "inputs_embeds": already embedded)."""
        size = self.check_inputs(batch)
        prefix = self.prepare_prefix(batch) if prefix is None else prefix
        actions = F.pad(self.normalize_actions(batch.actions), (0, self.max_action_dim - self.action_dim))
        noise = self.full_noise(noise, size).float()
        time = (self.sample_timestep(size) if timestep is None else timestep.to(self.device)).float()
        t = time[:, None, None]
        noisy = t * noise + (1 - t) * actions
        # actions=None: the model embeds `noise` (here x_t) and returns only the velocity; we take
        # the loss ourselves, masked, instead of its unmasked mean.
        out = self.hf_model(**prefix, noise=noisy.to(self.dtype), timestep=time)
        error = (out.logits.float() - (noise - actions)) ** 2  # [B, chunk, max_action_dim]
        dims = torch.arange(self.max_action_dim, device=error.device) < self.action_dim
        mask = batch.action_mask.to(error.device)[:, :, None] & dims[None, None, :]
        return (error * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)

    def compute_loss(self, batch: PolicyBatch, noise: torch.Tensor | None = None,
                     timestep: torch.Tensor | None = None,
                     prefix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Masked flow-matching MSE, averaged over every valid (step, dim) of the batch. Pass fixed
        `noise`/`timestep` to compare losses across steps (else drawn fresh each call)."""
        self.check_inputs(batch)
        per_sample = self.per_sample_loss(batch, noise, timestep, prefix)
        weights = batch.action_mask.to(per_sample.device).sum(dim=1).float()  # valid steps per sample
        return (per_sample * weights).sum() / weights.sum().clamp(min=1)

    def inner_model(self) -> nn.Module:
        """transformers' PI0Model (backbone `vlm` and action expert), under a LoRA wrapper too."""
        hf_model = self.hf_model
        if hasattr(hf_model, "get_base_model"):  # LoRA: the peft wrapper's own model
            hf_model = hf_model.get_base_model()
        return hf_model.model

    def prefix_embeddings(self, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, prompt_length, hidden]: the prefix as the backbone reads it, the cameras' image tokens
        first (n_cam x tokens_per_image), then the prompt's (what `hf_model` computes inside)."""
        return self.inner_model().embed_prefix(prefix["input_ids"], prefix["pixel_values"],
                                               prefix["pixel_attention_mask"])

    def loss_with_object_head(self, batch: PolicyBatch, head: nn.Module, object_pos: torch.Tensor) -> torch.Tensor:
        """The action loss and the object head's on the same image tokens, prepared and embedded once."""
        prefix = self.prepare_prefix(batch)
        embeds = self.prefix_embeddings(prefix)
        n_cam = len(self.cameras)
        image_tokens = embeds[:, : n_cam * self.tokens_per_image].reshape(
            embeds.shape[0], n_cam, self.tokens_per_image, embeds.shape[-1])
        action_loss = self.compute_loss(batch, prefix={**prefix, "inputs_embeds": embeds})
        return action_loss + head.weight * head.loss(image_tokens, object_pos)

    def log_prob(self, batch: PolicyBatch, noise: torch.Tensor | None = None,
                 timestep: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [B] likelihood surrogate: the NEGATIVE per-sample flow-matching loss (flow models
        have no cheap exact likelihood; this is a one-sample ELBO-like estimate, up to scale and
        constant). It is noisy: for ratios (PPO/GRPO) evaluate old and new policy with the SAME
        `noise` and `timestep`."""
        return -self.per_sample_loss(batch, noise, timestep)

    @torch.no_grad()
    def predict_chunk(self, inputs: PolicyInputs, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[B, chunk, A] raw actions: eager `sample_actions` from `noise` ([B, chunk, A] or
        [B, chunk, max_action_dim]; drawn when None), clipped to [q01, q99] and un-normalized."""
        batch = self.check_inputs(inputs)
        prefix = self.prepare_prefix(inputs)
        full_noise = self.full_noise(noise, batch)
        if self.decoder is not None:
            norm = self.decoder(**prefix, noise=full_noise)
        else:
            norm = self.hf_model.sample_actions(**prefix, noise=full_noise, num_steps=self.spec.num_inference_steps)
        return self.unnormalize_actions(norm)

    def _make_decoder(self, compile: bool) -> Any:
        from vla_dist.kernels import FlowDecoder

        return FlowDecoder(self.hf_model, self.spec.num_inference_steps, compile=compile)


def pi0_config(hf: dict[str, Any], spec: PolicySpec, tokenizer: Any) -> Any:
    """A PI0Config from the preset's `model.hf`, with what must agree with the tokenizer and the
    spec filled in: vocab size (when the preset leaves it out), <image> id, image size, chunk size.
    An inconsistent architecture raises ConfigError on model.hf / model.image_size."""
    from transformers import PI0Config

    kwargs = copy.deepcopy(dict(hf))
    vlm = kwargs.setdefault("vlm_config", {})
    text, vision = vlm.setdefault("text_config", {}), vlm.setdefault("vision_config", {})
    text.setdefault("vocab_size", len(tokenizer))
    vlm["vocab_size"] = text["vocab_size"]
    vlm["image_token_index"] = processing.token_id(tokenizer, processing.IMAGE)
    vision["image_size"] = spec.image_size
    patch = vision.get("patch_size", 14)
    if spec.image_size % patch:
        raise ConfigError("model.image_size", f"{spec.image_size} is not a multiple of the vision patch size {patch}")
    kwargs.update(chunk_size=spec.chunk_size, num_inference_steps=spec.num_inference_steps)
    try:
        config = PI0Config(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError("model.hf", f"not a valid PI0Config: {error}") from None
    backbone, expert = config.vlm_config.text_config, config.dit_config
    for key in _SHARED_WITH_EXPERT:
        if getattr(backbone, key) != getattr(expert, key):
            raise ConfigError("model.hf", f"dit_config.{key} = {getattr(expert, key)} must equal "
                              f"vlm_config.text_config.{key} = {getattr(backbone, key)} "
                              "(the expert reads its KV cache)")
    if config.vlm_config.projection_dim != backbone.hidden_size:
        raise ConfigError("model.hf", f"vlm_config.projection_dim {config.vlm_config.projection_dim} must equal the "
                          f"text hidden_size {backbone.hidden_size}")
    if spec.action_dim > config.max_action_dim or spec.state_dim > config.max_state_dim:
        raise ConfigError("model.hf", f"max_action_dim/max_state_dim {config.max_action_dim}/{config.max_state_dim} "
                          f"are below the dataset's {spec.action_dim}/{spec.state_dim}")
    return config
