"""Discrete action tokens, OpenVLA-style, on a transformers VLM (PaliGemma for the tiny preset,
LLaVA = Llama-2-7B + SigLIP-so400m for openvla-7b).

Each action dim is normalized to [-1, 1] (q01/q99, clipped) and cut into 256 uniform bins; bin b is
the tokenizer's <act_b> token (256 tokens appended to the locally built vocabulary). The model reads
    [<pad>...] [<image> x n_cam*tokens_per_image] <bos> prompt   (left-padded to prompt_length)
and predicts chunk_size x A action tokens, step-major (step 0 dims 0..A-1, step 1, ...). Training is
teacher-forced cross-entropy over the full vocabulary on action tokens only (OpenVLA's loss); decoding
is greedy over the 256 action tokens, then bin centres are un-normalized, so predictions lie in
[q01, q99] exactly. The robot state is not an input (as in OpenVLA).

PaliGemma is a prefix LM: the prompt attends bidirectionally (token_type_ids 0), action tokens
causally (1). LLaVA/Llama is causal throughout.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vla_dist.errors import ConfigError
from vla_dist.models import processing
from vla_dist.models.files import FAMILY_MODEL_TYPES, PretrainedError
from vla_dist.models.policy import PolicyBatch, PolicyInputs, PolicySpec, VLAPolicy
from vla_dist.models.processing import NUM_ACTION_BINS, Normalization

if TYPE_CHECKING:
    from vla_dist.config.schema import ModelSection

# The language model's attention and MLP projections only (the vision tower has q/k/v too).
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
HF_MODEL_TYPES = FAMILY_MODEL_TYPES["action_tokens"]


class ActionTokenPolicy(VLAPolicy):
    """Attributes beyond VLAPolicy's: action_token_ids LongTensor [256] (bin -> token id),
    bin_centers float32 [256] (bin -> normalized value in [-1, 1]), image_token_id, tokens_per_image,
    prompt_length, num_action_tokens = chunk_size * action_dim, prefix_lm (PaliGemma: True)."""

    family = "action_tokens"

    def __init__(self, hf_model: Any, tokenizer: Any, normalization: Normalization, spec: PolicySpec) -> None:
        super().__init__(hf_model, tokenizer, normalization, spec)
        config = hf_model.config
        self.prefix_lm = config.model_type == "paligemma"
        self.image_token_id = processing.token_id(tokenizer, processing.IMAGE)
        if config.image_token_id != self.image_token_id:
            raise ValueError(f"config image_token_id {config.image_token_id} is not the tokenizer's <image> "
                             f"id {self.image_token_id}")
        vision = config.vision_config
        self.tokens_per_image = (vision.image_size // vision.patch_size) ** 2
        self.prompt_length = len(self.cameras) * self.tokens_per_image + 1 + spec.max_text_tokens
        self.num_action_tokens = spec.chunk_size * spec.action_dim
        ids = [processing.token_id(tokenizer, token) for token in processing.ACTION_TOKENS]
        if max(ids) >= config.get_text_config().vocab_size:
            raise ValueError(
                f"action token ids reach {max(ids)}, the vocabulary has {config.get_text_config().vocab_size}")
        self.register_buffer("action_token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        edges = torch.linspace(-1.0, 1.0, NUM_ACTION_BINS + 1, dtype=torch.float64)
        self.register_exact_buffer("bin_centers", ((edges[:-1] + edges[1:]) / 2).float())

    @classmethod
    def build(cls, model_cfg: ModelSection, spec: PolicySpec, normalization: Normalization,
              meta: bool = False) -> ActionTokenPolicy:
        import transformers

        tokenizer = processing.build_tokenizer(action_tokens=True)
        config = vlm_config(model_cfg.hf, spec, tokenizer)
        model_class = getattr(transformers, {"paligemma": "PaliGemmaForConditionalGeneration",
                                             "llava": "LlavaForConditionalGeneration"}[config.model_type])
        with torch.device("meta" if meta else "cpu"):
            hf_model = model_class(config)
        return cls(hf_model, tokenizer, normalization, spec)

    @classmethod
    def from_foundation(cls, path: Path, spec: PolicySpec, normalization: Normalization) -> ActionTokenPolicy:
        """A plain transformers PaliGemma or LLaVA checkpoint (config.json + safetensors +
        tokenizer.json, as their `save_pretrained` write them) as this family's backbone, for the
        dataset in `spec`/`normalization`; its image size is the checkpoint's.

        The 256 action tokens <act_000>..<act_255> are ADDED to the vocabulary (OpenVLA instead
        overwrote Llama's 256 least-used ids; adding keeps every word the backbone knows). The
        embedding grows by 256 rows (the tied output head with it) that transformers initialises
        from the model's own init distribution, not the mean of the others: rows that differ, so
        that even a LoRA run, which leaves the embedding frozen, can tell the bins apart (its
        adapters learn to point the hidden state at one of 256 distinct fixed directions; a full
        fine-tune trains the rows too). A tokenizer that already has them keeps its ids. Loads on
        the CPU: whole, or partitioned inside a ZeRO-3 rank's `partitioned_loading`. Raises
        PretrainedError."""
        from tokenizers import AddedToken

        from vla_dist.models.foundation import load_foundation

        hf_model, tokenizer = load_foundation(path, spec)
        spec.image_size = int(hf_model.config.vision_config.image_size)
        vocabulary = tokenizer.get_vocab()
        new = [AddedToken(token, special=True, normalized=False) for token in processing.ACTION_TOKENS
               if token not in vocabulary]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        if len(tokenizer) > hf_model.config.get_text_config().vocab_size:
            hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        try:
            return cls(hf_model, tokenizer, normalization, spec)
        except ValueError as error:  # no <image> token, image_token_id not the tokenizer's
            raise PretrainedError(f"{path}: {error}") from None

    def lora_target_modules(self) -> list[str] | str:
        return self.spec.lora_targets or LORA_TARGETS

    # --- tokens <-> actions ----------------------------------------------------------------------

    def actions_to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """raw [..., A] -> long [..., A] bin indices in 0..255."""
        norm = self.normalize_actions(actions)
        return ((norm + 1) / 2 * NUM_ACTION_BINS).floor().long().clamp(0, NUM_ACTION_BINS - 1)

    def bins_to_actions(self, bins: torch.Tensor) -> torch.Tensor:
        """long [..., A] bin indices -> float32 raw [..., A] (bin centres, un-normalized)."""
        return self.unnormalize_actions(self.bin_centers[bins.to(self.bin_centers.device)])

    # --- inputs ------------------------------------------------------------------------------

    def prepare_prompt(self, inputs: PolicyInputs) -> dict[str, torch.Tensor]:
        """The prompt on the model's device, left-padded so action tokens follow it directly:
        input_ids [B, prompt_length] long, attention_mask [B, prompt_length] long,
        position_ids [B, prompt_length] long (0 at the first real token; pads 0),
        pixel_values [B * n_cam, 3, image_size, image_size] (model dtype, in [-1, 1]),
        and for PaliGemma token_type_ids [B, prompt_length] long zeros (bidirectional prefix).
        The next token's position is position_ids[:, -1] + 1."""
        self.check_inputs(inputs)
        prefix = [self.image_token_id] * (len(self.cameras) * self.tokens_per_image) + [self.tokenizer.bos_token_id]
        input_ids, attention_mask = processing.pack_prompts(
            self.tokenizer, inputs.instructions, self.spec.max_text_tokens, prefix, self.prompt_length, left_pad=True
        )
        device = self.device
        prompt = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
            "pixel_values": self.pixel_values(inputs.images).flatten(0, 1),
        }
        if self.prefix_lm:
            prompt["token_type_ids"] = torch.zeros_like(prompt["input_ids"])
        return prompt

    def action_logits(self, inputs: PolicyInputs, bins: torch.Tensor) -> torch.Tensor:
        """Teacher-forced float32 logits [B, L, V] (L = num_action_tokens, V the full vocabulary):
        row k predicts action token k given the prompt and tokens < k. `bins`: long [B, chunk, A]."""
        size = self.check_inputs(inputs)
        prompt = self.prepare_prompt(inputs)
        targets = self.action_token_ids[bins.reshape(size, -1).to(self.device)]
        count = targets.shape[1]
        ones = torch.ones_like(targets)
        steps = torch.arange(1, count + 1, device=self.device)
        kwargs = {
            "input_ids": torch.cat([prompt["input_ids"], targets], dim=1),
            "attention_mask": torch.cat([prompt["attention_mask"], ones], dim=1),
            "position_ids": torch.cat([prompt["position_ids"], prompt["position_ids"][:, -1:] + steps], dim=1),
            "pixel_values": prompt["pixel_values"],
        }
        if self.prefix_lm:
            kwargs["token_type_ids"] = torch.cat([prompt["token_type_ids"], ones], dim=1)
        # logits_to_keep: only the last prompt position and the action positions reach the LM head
        # (the full-vocabulary head over a ~300-token prompt would dominate the cost at 7B).
        out = self.hf_model(**kwargs, use_cache=False, logits_to_keep=count + 1)
        return out.logits[:, :-1].float()

    def _targets(self, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, L, V], target bins [B, L], valid [B, L] bool) of a batch."""
        self.check_inputs(batch)
        bins = self.actions_to_bins(batch.actions).to(self.device)
        valid = batch.action_mask.to(self.device).repeat_interleave(self.action_dim, dim=1)
        return self.action_logits(batch, bins), bins.flatten(1), valid

    # --- the interface -------------------------------------------------------------------------

    def compute_loss(self, batch: PolicyBatch) -> torch.Tensor:
        """Cross-entropy (full vocabulary) over the action tokens of valid steps, averaged."""
        logits, bins, valid = self._targets(batch)
        if not bool(valid.any()):  # every step padded: a zero that keeps the graph (no NaN mean)
            return logits.sum() * 0.0
        labels = self.action_token_ids[bins].masked_fill(~valid, -100)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    def log_prob(self, batch: PolicyBatch) -> torch.Tensor:
        """float32 [B]: sum over valid steps of the action tokens' log-probabilities under the
        distribution decoding samples from (softmax over the 256 action tokens only)."""
        logits, bins, valid = self._targets(batch)
        logp = logits.index_select(-1, self.action_token_ids).log_softmax(-1)
        return (logp.gather(-1, bins[..., None])[..., 0] * valid).sum(dim=1)

    @torch.no_grad()
    def predict_bins(self, inputs: PolicyInputs) -> torch.Tensor:
        """long [B, chunk, A]: greedy decoding restricted to the 256 action tokens (eager, KV cache)."""
        batch = self.check_inputs(inputs)
        prompt = self.prepare_prompt(inputs)
        out = self.hf_model(**prompt, use_cache=True, logits_to_keep=1)
        past, mask, position = out.past_key_values, prompt["attention_mask"], prompt["position_ids"][:, -1:]
        chosen: list[torch.Tensor] = []
        for step in range(self.num_action_tokens):
            bins = out.logits[:, -1].index_select(-1, self.action_token_ids).argmax(-1)  # [B]
            chosen.append(bins)
            if step == self.num_action_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            position = position + 1
            out = self.hf_model(input_ids=self.action_token_ids[bins][:, None], attention_mask=mask,
                                position_ids=position, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
        return torch.stack(chosen, dim=1).reshape(batch, self.chunk_size, self.action_dim)

    @torch.no_grad()
    def predict_chunk(self, inputs: PolicyInputs, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[B, chunk, A] raw actions: greedy bins -> bin centres -> un-normalized. `noise` is
        ignored (decoding is deterministic); it is accepted for the common interface."""
        if self.decoder is not None:
            actions = self.decoder(**self.prepare_prompt(inputs))
            return actions.reshape(actions.shape[0], self.chunk_size, self.action_dim).to(torch.float32)
        return self.bins_to_actions(self.predict_bins(inputs))

    def _make_decoder(self, compile: bool) -> Any:
        from vla_dist.kernels import TokenDecoder

        return TokenDecoder(
            self.hf_model, self.action_token_ids, self.bin_centers, self.num_action_tokens,
            unnormalize=self.unnormalize_actions, compile=compile, action_dim=self.action_dim,
        )


def vlm_config(hf: dict[str, Any], spec: PolicySpec, tokenizer: Any) -> Any:
    """The transformers config from the preset's `model.hf` (`model_type`: paligemma or llava), with
    the vocabulary size (when left out), <image> id and image size filled in to agree with the
    tokenizer and the spec. Inconsistencies raise ConfigError on model.hf / model.image_size."""
    from transformers import AutoConfig

    kwargs = copy.deepcopy(dict(hf))
    model_type = kwargs.pop("model_type", None)
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError("model.hf", f"model_type must be one of {', '.join(HF_MODEL_TYPES)} for the action_tokens "
                          f"family; got {model_type!r}")
    text, vision = kwargs.setdefault("text_config", {}), kwargs.setdefault("vision_config", {})
    text.setdefault("vocab_size", len(tokenizer))
    kwargs["image_token_index"] = processing.token_id(tokenizer, processing.IMAGE)
    vision["image_size"] = spec.image_size
    patch = vision.get("patch_size", 14)
    if spec.image_size % patch:
        raise ConfigError("model.image_size", f"{spec.image_size} is not a multiple of the vision patch size {patch}")
    if model_type == "paligemma":
        kwargs["vocab_size"] = text["vocab_size"]
    elif kwargs.setdefault("vision_feature_select_strategy", "full") != "full":
        # SigLIP has no CLS token: "default" would drop a patch and break the image-token count.
        raise ConfigError("model.hf", "vision_feature_select_strategy must be 'full' (SigLIP has no CLS token)")
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError("model.hf", f"not a valid {model_type} config: {error}") from None
    if model_type == "paligemma" and config.projection_dim != config.text_config.hidden_size:
        raise ConfigError("model.hf", f"projection_dim {config.projection_dim} must equal the text hidden_size "
                          f"{config.text_config.hidden_size}")
    if len(tokenizer) > config.get_text_config().vocab_size:
        raise ConfigError("model.hf", f"text vocab_size {config.get_text_config().vocab_size} is below the "
                          f"tokenizer's {len(tokenizer)} tokens")
    return config
