"""The one policy interface that training, evaluation and RL code against, and its constructors.

    policy = build_policy(cfg.model, manifest)          # random init from the preset, or model.pretrained
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
    check_adapter_dir,
    check_pretrained_dir,
    check_state_inputs,
    is_foundation_dir,
    weights_readable_like,
)
from vla_dist.models.processing import Normalization
from vla_dist.spaces import ACTION_SPACE, CAMERAS, STATE_SPACE, action_space_type

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
        """= compute_loss: what a DeepSpeed engine's `engine(batch)` calls."""
        return self.compute_loss(batch)

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
        family_class = _family_class(spec_data["family"])
        if cls is not VLAPolicy and family_class is not cls:
            raise PretrainedError(f"{Path(path) / SPEC_FILE}: family {spec_data['family']!r}, not {cls.family!r}")
        return family_class._load(Path(path), PolicySpec.from_dict(spec_data))

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


def build_policy(model_cfg: ModelSection, manifest: Mapping[str, Any], device: str | torch.device = "cpu") -> VLAPolicy:
    """The policy a run trains/evaluates: `model_cfg.pretrained` loaded, else a random init of the
    preset (seed torch first, e.g. with run.seed, for a reproducible init). A pretrained policy keeps
    its own normalization statistics; the manifest's cameras and dims must match it."""
    spec = spec_from(model_cfg, manifest)
    if model_cfg.pretrained and is_foundation_dir(model_cfg.pretrained):
        try:  # a plain transformers checkpoint: the dataset gives statistics, dims and cameras
            policy = _family_class(model_cfg.family).from_foundation(
                Path(model_cfg.pretrained), spec, Normalization.from_manifest(manifest))
        except PretrainedError as error:
            raise ConfigError("model.pretrained", str(error)) from None
    elif model_cfg.pretrained:
        try:
            policy = load_policy(model_cfg.pretrained)
        except PretrainedError as error:
            raise ConfigError("model.pretrained", str(error)) from None
        why = pretrained_mismatch(policy.spec, spec)
        if why and not model_cfg.retarget:
            raise ConfigError("model.pretrained", f"{model_cfg.pretrained}: {why} {RETARGET_HINT}")
        if why:
            try:
                policy = policy.retargeted(spec, Normalization.from_manifest(manifest))
            except PretrainedError as error:
                raise ConfigError("model.retarget", str(error)) from None
        policy.spec.num_inference_steps = model_cfg.num_inference_steps
        policy.spec.lora_targets = model_cfg.lora_targets
        if spec.state_inputs is not None:  # asked for explicitly; else the pretrained policy's own choice
            policy.set_state_inputs(spec.state_inputs)
    else:
        policy = _family_class(model_cfg.family).build(model_cfg, spec, Normalization.from_manifest(manifest))
    policy.hf_model.to(DTYPES[model_cfg.dtype])
    policy.spec.dtype = model_cfg.dtype
    return policy.to(device)


RETARGET_HINT = "(model.retarget=true learns the dataset's action space from its weights)"


def pretrained_mismatch(theirs: PolicySpec, dataset: PolicySpec) -> str | None:
    """Why a saved policy (`theirs`) does not act in the dataset's spaces, or None."""
    if theirs.cameras != dataset.cameras or theirs.state_dim != dataset.state_dim:
        return (f"cameras/state dim {theirs.cameras}/{theirs.state_dim}, the dataset "
                f"{dataset.cameras}/{dataset.state_dim}")
    if (theirs.action_dim, theirs.action_space) != (dataset.action_dim, dataset.action_space) and not (
            theirs.action_space is None and theirs.action_dim == dataset.action_dim):  # (saved before it was recorded)
        return (f"{theirs.action_space or 'unrecorded'} actions of {theirs.action_dim} dims, the dataset "
                f"{dataset.action_space or 'another robot'}'s of {dataset.action_dim}")
    return None


def load_policy(path: str | os.PathLike[str]) -> VLAPolicy:
    """Load a saved policy, whichever family (vla_dist.json says), with its LoRA adapter merged in
    when the directory holds one (`vla-dist export` without --merge-lora writes the base weights
    plus adapter/). Raises PretrainedError.

    The adapter is part of what such a directory means: loading the base alone evaluated (or trained
    from) the untuned base, silently. It is merged rather than kept as a peft wrapper so every user
    of a loaded policy gets a plain `VLAPolicy` whose weights are the fine-tuned ones: eval's
    compiled decoder, `save_pretrained` (writes the merged model), and training from
    `model.pretrained`, where a full fine-tune then trains the merged weights and a new LoRA adapts
    them (no peft model nested in another), exactly as from a `--merge-lora` export."""
    policy = VLAPolicy.from_pretrained(path)
    adapter = check_adapter_dir(Path(path))
    if adapter is not None:
        merge_adapter(policy, adapter)
    return policy


def merge_adapter(policy: VLAPolicy, adapter_dir: str | os.PathLike[str]) -> VLAPolicy:
    """Merge the peft adapter in `adapter_dir` into `policy.hf_model` (in place). Refuses an adapter
    whose weights do not all fit the model: peft would only warn and leave those LoRA weights at
    their init (B = 0: the base model again). Raises PretrainedError."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = True
        peft_model = PeftModel(policy.hf_model, config)
        result = peft_model.load_adapter(str(adapter_dir), adapter_name="default", is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise PretrainedError(f"{adapter_dir}: the LoRA adapter does not load onto {type(policy.hf_model).__name__}: "
                              f"{str(error).splitlines()[0]}") from None
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise PretrainedError(f"{adapter_dir / 'adapter_model.safetensors'} does not fit the policy beside it: "
                              f"{len(result.missing_keys)} adapter weights missing, {len(result.unexpected_keys)} "
                              f"unexpected, e.g. {bad[0]!r}")
    policy.hf_model = peft_model.merge_and_unload()
    return policy


def count_parameters(model_cfg: ModelSection, *, exclude_unused: bool = False) -> int:
    """Parameters of the preset's model, built on the meta device (nothing allocated: works for the
    full-size presets). `exclude_unused`: leave out weights the family never uses (pi0: the action
    expert's copy of the vocabulary embedding, frozen at build)."""
    spec = spec_from(model_cfg, placeholder_manifest())
    policy = _family_class(model_cfg.family).build(model_cfg, spec, Normalization.from_manifest(placeholder_manifest()),
                                                   meta=True)
    unused = set(getattr(policy, "unused_parameters", list)()) if exclude_unused else set()
    return sum(p.numel() for name, p in policy.hf_model.named_parameters() if name not in unused)


def spec_from(model_cfg: ModelSection, manifest: Mapping[str, Any]) -> PolicySpec:
    return PolicySpec(
        family=model_cfg.family,
        chunk_size=model_cfg.chunk_size,
        action_dim=int(manifest["action_space"]["dim"]),
        state_dim=int(manifest["state_space"]["dim"]),
        cameras=list(manifest["cameras"]),
        image_size=model_cfg.image_size,
        max_text_tokens=model_cfg.max_text_tokens,
        num_inference_steps=model_cfg.num_inference_steps,
        dtype=model_cfg.dtype,
        lora_targets=model_cfg.lora_targets,
        state_inputs=state_input_dims(model_cfg.state_inputs, manifest),
        action_space=action_space_type(manifest["action_space"]),
    )


def state_input_dims(names: list[str] | None, manifest: Mapping[str, Any]) -> list[int] | None:
    """model.state_inputs (names) -> indices into the dataset's state vector; None stays None (all)."""
    if names is None:
        return None
    known = list(manifest["state_space"].get("names") or [])
    check_state_inputs(names, known)
    return sorted(known.index(name) for name in names)


def placeholder_manifest() -> dict[str, Any]:
    """Manifest fields a build needs, for the simulator's action/state spaces and cameras
    (vla_dist/spaces.py) with unit statistics (parameter counting, smoke tests; training uses the
    dataset's manifest)."""
    def stats(dim: int) -> dict[str, list[float]]:
        return {"mean": [0.0] * dim, "std": [1.0] * dim, "min": [-1.0] * dim, "max": [1.0] * dim,
                "q01": [-1.0] * dim, "q99": [1.0] * dim}

    return {"action_space": dict(ACTION_SPACE), "state_space": dict(STATE_SPACE), "cameras": list(CAMERAS),
            "action_stats": stats(ACTION_SPACE["dim"]), "state_stats": stats(STATE_SPACE["dim"])}


def _family_class(family: str) -> type[VLAPolicy]:
    # Imported here: the family modules import this one.
    from vla_dist.models.action_tokens import ActionTokenPolicy
    from vla_dist.models.pi0 import PI0Policy

    if family not in FAMILIES:
        raise ConfigError("model.family", f"must be one of {', '.join(FAMILIES)}; got {family!r}")
    return {cls.family: cls for cls in (PI0Policy, ActionTokenPolicy)}[family]


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), "float32")
