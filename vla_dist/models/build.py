"""Constructors of a `VLAPolicy`: from a run's config and its dataset's manifest (`build_policy`: a
preset's random init, a saved policy, a plain transformers checkpoint, or a policy re-targeted to the
dataset's action space), from a saved directory (`load_policy`, its LoRA adapter merged), and the
specs and counts around them. The interface itself is in policy.py."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vla_dist.errors import ConfigError
from vla_dist.models.files import PretrainedError, check_adapter_dir, check_state_inputs, is_foundation_dir
from vla_dist.models.policy import DTYPES, PolicySpec, VLAPolicy, family_class
from vla_dist.models.processing import Normalization
from vla_dist.spaces import ACTION_SPACE, CAMERAS, STATE_SPACE, action_space_type

if TYPE_CHECKING:
    from vla_dist.config.schema import ModelSection


def build_policy(model_cfg: ModelSection, manifest: Mapping[str, Any], device: str | torch.device = "cpu") -> VLAPolicy:
    """The policy a run trains/evaluates: `model_cfg.pretrained` loaded, else a random init of the
    preset (seed torch first, e.g. with run.seed, for a reproducible init). A pretrained policy keeps
    its own normalization statistics; the manifest's cameras and dims must match it."""
    spec = spec_from(model_cfg, manifest)
    if model_cfg.pretrained and is_foundation_dir(model_cfg.pretrained):
        try:  # a plain transformers checkpoint: the dataset gives statistics, dims and cameras
            policy = family_class(model_cfg.family).from_foundation(
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
        policy = family_class(model_cfg.family).build(model_cfg, spec, Normalization.from_manifest(manifest))
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
    policy = family_class(model_cfg.family).build(model_cfg, spec, Normalization.from_manifest(placeholder_manifest()),
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
