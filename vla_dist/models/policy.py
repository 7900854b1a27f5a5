"""The one policy interface that training, evaluation and RL code against (its constructors from a
config or a directory are in build.py).

    policy = build_policy(cfg.model, manifest)          # build.py: random init, or model.pretrained
    loss = policy.compute_loss(batch)                   # scalar; what DeepSpeed's engine(batch) returns
    chunk = policy.predict_chunk(inputs)                # [B, chunk, A] raw action units
    policy.save_pretrained(d); load_policy(d)           # HF-format directory (see files.py)

Units: `PolicyInputs`/`PolicyBatch` and `predict_chunk` speak raw units (images uint8 as stored,
state and actions as the simulator uses them). Normalization is inside the policy, with the
statistics of the manifest it was built from, saved beside the weights (normalization.json).
A family (pi0.py, action_tokens.py) knows nothing of ZeRO, Ray or the simulator.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vla_dist.errors import ConfigError
from vla_dist.models import processing
from vla_dist.models.files import (
    FAMILIES,
    SPEC_FILE,
    SPEC_VERSION,
    PretrainedError,
    check_pretrained_dir,
    weights_readable_like,
)
from vla_dist.models.object_head import OBJECT_HEAD
from vla_dist.models.processing import Normalization

if TYPE_CHECKING:
    from vla_dist.config.schema import ModelSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class PolicyInputs:
    images: torch.Tensor  # uint8 [B, n_cam, H, W, 3], camera order = the policy's `cameras` (manifest order)
    state: torch.Tensor  # float32 [B, S] raw units
    instructions: list[str]  # B language instructions


@dataclass
class PolicyBatch(PolicyInputs):
    actions: torch.Tensor  # float32 [B, chunk, A] raw units: actions t..t+chunk-1
    action_mask: torch.Tensor  # bool [B, chunk]: False where the episode had ended (padding)


@dataclass
class PolicySpec:
    """What a saved policy needs beside its weights (vla_dist.json)."""

    family: str
    chunk_size: int
    action_dim: int
    state_dim: int
    cameras: list[str]
    image_size: int  # model input resolution; images are resized to it
    max_text_tokens: int  # instruction prompt length in tokens (cut, then padded)
    num_inference_steps: int = 10  # pi0: Euler steps of sample_actions
    dtype: str = "float32"
    lora_targets: str | None = None  # a peft target_modules regex overriding the family's default
    state_inputs: list[int] | None = None  # state dims the policy reads (model.state_inputs resolved); None: all
    # which of the simulator's action spaces its actions are in (vla_dist/spaces.py); None: another
    # robot's, or saved before it was recorded (the dims decide)
    action_space: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicySpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class VLAPolicy(nn.Module, abc.ABC):
    """Abstract base of the model families. Attributes every family has:

    hf_model: the transformers module (what LoRA wraps, what save_pretrained writes);
    tokenizer; normalization (Normalization); spec (PolicySpec); chunk_size, action_dim, state_dim,
    cameras, image_size; float32 buffers action_low/action_high/action_scale [A], state_mean/state_std
    [S] that follow the module's device but never its dtype (a bf16 model keeps exact statistics)."""

    family: ClassVar[str]

    def __init__(self, hf_model: nn.Module, tokenizer: Any, normalization: Normalization, spec: PolicySpec) -> None:
        super().__init__()
        if (normalization.action_dim, normalization.state_dim) != (spec.action_dim, spec.state_dim):
            raise ValueError(
                f"normalization has action/state dims {normalization.action_dim}/{normalization.state_dim}, "
                f"the policy {spec.action_dim}/{spec.state_dim}"
            )
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.normalization = normalization
        self.spec = spec
        self.chunk_size, self.action_dim, self.state_dim = spec.chunk_size, spec.action_dim, spec.state_dim
        self.cameras, self.image_size = list(spec.cameras), spec.image_size
        self._exact: dict[str, torch.Tensor] = {}
        for name, tensor in normalization.tensors().items():
            self.register_exact_buffer(name, tensor)
        self.set_state_inputs(spec.state_inputs)

    def set_state_inputs(self, dims: list[int] | None) -> None:
        """Read only these state dims (None: all); the others are zeroed after normalization."""
        keep = torch.ones(self.spec.state_dim)
        if dims is not None:
            if not all(0 <= dim < self.spec.state_dim for dim in dims):
                raise ValueError(f"state_inputs {dims} outside the state's {self.spec.state_dim} dims")
            keep = torch.zeros(self.spec.state_dim)
            keep[list(dims)] = 1.0
        self.spec.state_inputs = None if dims is None else list(dims)
        self.register_exact_buffer("state_keep", keep)

    def register_exact_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """A non-persistent float32 buffer that follows the module's device but not its dtype."""
        self._exact[name] = tensor.float()
        self.register_buffer(name, tensor.float(), persistent=False)

    # --- the interface -------------------------------------------------------------------------

    @abc.abstractmethod
    def compute_loss(self, batch: PolicyBatch) -> torch.Tensor:
        """Scalar training loss, averaged over valid (action_mask) steps only."""

    @abc.abstractmethod
    def predict_chunk(self, inputs: PolicyInputs, noise: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [B, chunk, A] actions in raw units (un-normalized). No gradients."""

    def enable_compiled_decoding(self, compile: bool = True) -> None:
        """Route `predict_chunk` through this family's static-shape decoder in `vla_dist.kernels`
        (torch.compile'd unless `compile=False`). Compilation happens on the first call per batch
        bucket and is cached for the process. Kept outside the module tree (the decoder holds a
        reference to `hf_model`; registering it would duplicate the weights in state_dict)."""
        object.__setattr__(self, "_decoder", self._make_decoder(compile))

    @property
    def decoder(self) -> Any | None:
        return self.__dict__.get("_decoder")

    def _make_decoder(self, compile: bool) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no compiled decoder")

    @abc.abstractmethod
    def log_prob(self, batch: PolicyBatch) -> torch.Tensor:
        """float32 [B]: log-likelihood (or a family-documented surrogate) of batch.actions."""

    @abc.abstractmethod
    def lora_target_modules(self) -> list[str] | str:
        """peft `target_modules` for `hf_model`: the language model(s) only, never the vision tower."""

    @classmethod
    @abc.abstractmethod
    def build(cls, model_cfg: ModelSection, spec: PolicySpec, normalization: Normalization,
              meta: bool = False) -> VLAPolicy:
        """A randomly initialised policy (on the meta device when `meta`: nothing allocated)."""

    def forward(self, batch: PolicyBatch) -> torch.Tensor:
        """= compute_loss: what a DeepSpeed engine's `engine(batch)` calls; with training's object head
        attached (models/object_head.py, train.object_target), plus its weighted loss."""
        head = self._modules.get(OBJECT_HEAD)
        if head is None:
            return self.compute_loss(batch)
        target = getattr(batch, "object_pos", None)
        if target is None:
            raise ValueError("the object head (train.object_target) needs batches with object positions "
                             "(Episode.object_pos, recorded by vla-dist collect)")
        return self.loss_with_object_head(batch, head, target)

    def loss_with_object_head(self, batch: PolicyBatch, head: nn.Module, object_pos: torch.Tensor) -> torch.Tensor:
        """compute_loss + head.weight x the object head's loss on this family's image tokens."""
        raise NotImplementedError(f"the {self.family} family has no image tokens for an object head yet")

    # --- shared processing ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def check_inputs(self, inputs: PolicyInputs) -> int:
        """Validate shapes against the policy; returns the batch size."""
        images, state = inputs.images, inputs.state
        batch = images.shape[0] if images.dim() == 5 else -1
        if images.dim() != 5 or images.shape[1] != len(self.cameras) or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [B, {len(self.cameras)} ({', '.join(self.cameras)}), H, W, 3], "
                             f"got {tuple(images.shape)}")
        if state.shape != (batch, self.state_dim):
            raise ValueError(f"state must be [B={batch}, {self.state_dim}], got {tuple(state.shape)}")
        if len(inputs.instructions) != batch:
            raise ValueError(f"{len(inputs.instructions)} instructions for a batch of {batch}")
        if isinstance(inputs, PolicyBatch):
            want = (batch, self.chunk_size, self.action_dim)
            if tuple(inputs.actions.shape) != want:
                raise ValueError(f"actions must be {list(want)}, got {tuple(inputs.actions.shape)}")
            if tuple(inputs.action_mask.shape) != want[:2] or inputs.action_mask.dtype != torch.bool:
                raise ValueError(f"action_mask must be bool {list(want[:2])}, got "
                                 f"{inputs.action_mask.dtype} {tuple(inputs.action_mask.shape)}")
        return batch

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, n_cam, H, W, 3] -> [B, n_cam, 3, image_size, image_size] in [-1, 1], model dtype."""
        return processing.preprocess_images(images.to(self.device), self.image_size, self.dtype)

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        """raw [B, S] -> standardized float32 [B, S]; dims outside spec.state_inputs are 0 (not read)."""
        return (state.to(self.state_mean.device, torch.float32) - self.state_mean) / self.state_std * self.state_keep

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """raw [..., A] -> float32 [..., A] in [-1, 1] (q01 -> -1, q99 -> 1, clipped)."""
        actions = actions.to(self.action_low.device, torch.float32)
        return processing.normalize_actions(actions, self.action_low, self.action_scale)

    def unnormalize_actions(self, norm: torch.Tensor) -> torch.Tensor:
        """normalized [..., D] (D >= A; padded dims beyond A are dropped) -> float32 raw [..., A],
        clipped to [q01, q99]. Used on model outputs by predict_chunk and the compiled kernels."""
        norm = norm[..., : self.action_dim].to(self.action_low.device, torch.float32)
        return processing.unnormalize_actions(norm, self.action_low, self.action_high, self.action_scale)

    def _apply(self, fn: Any, recurse: bool = True) -> VLAPolicy:
        # .to(dtype)/.bfloat16() (DeepSpeed bf16 does this) would round the statistics: re-create them
        # in float32 on whatever device the module went to.
        super()._apply(fn, recurse)
        for name, tensor in self._exact.items():
            self._buffers[name] = tensor.to(self._buffers[name].device)
        return self

    # --- saving and loading --------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> None:
        """Write the HF-format directory described in files.py (safetensors weights)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.hf_model.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        self.normalization.save(out)
        spec = {**asdict(self.spec), "dtype": _dtype_name(self.dtype)}
        spec = {"format_version": SPEC_VERSION, **spec, "hf_class": type(self.hf_model).__name__}
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        weights_readable_like(out, out / SPEC_FILE)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> VLAPolicy:
        """Load a directory written by save_pretrained. On VLAPolicy it dispatches on the family;
        on a family class the directory must hold that family. Raises PretrainedError."""
        spec_data = check_pretrained_dir(path)
        saved = family_class(spec_data["family"])
        if cls is not VLAPolicy and saved is not cls:
            raise PretrainedError(f"{Path(path) / SPEC_FILE}: family {spec_data['family']!r}, not {cls.family!r}")
        return saved._load(Path(path), PolicySpec.from_dict(spec_data))

    @classmethod
    def from_foundation(cls, path: Path, spec: PolicySpec, normalization: Normalization) -> VLAPolicy:
        """A plain transformers checkpoint (files.is_foundation_dir) as this family's policy, with the
        dataset's statistics and dims in `spec`/`normalization`. Raises PretrainedError."""
        raise PretrainedError(f"{path}: the {cls.family} family cannot start from a plain transformers checkpoint yet")

    def retargeted(self, dataset: PolicySpec, normalization: Normalization) -> VLAPolicy:
        """This policy's networks acting in another action space (the dataset's `dataset` spec and
        statistics): the embodiment recipes' re-targeting. Raises PretrainedError."""
        raise PretrainedError(f"the {self.family} family cannot be re-targeted to another action space yet")

    @classmethod
    def _load(cls, path: Path, spec: PolicySpec) -> VLAPolicy:
        from vla_dist.models.files import load_hf_model, raise_on_bad_keys

        hf_model, info = load_hf_model(path, dtype=DTYPES.get(spec.dtype, torch.float32))
        raise_on_bad_keys(path, info)  # transformers would only warn and leave random weights: refuse
        return cls(hf_model, processing.load_tokenizer(path), Normalization.load(path), spec)


def family_class(family: str) -> type[VLAPolicy]:
    # Imported here: the family modules import this one.
    from vla_dist.models.action_tokens import ActionTokenPolicy
    from vla_dist.models.pi0 import PI0Policy

    if family not in FAMILIES:
        raise ConfigError("model.family", f"must be one of {', '.join(FAMILIES)}; got {family!r}")
    return {cls.family: cls for cls in (PI0Policy, ActionTokenPolicy)}[family]


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), "float32")
