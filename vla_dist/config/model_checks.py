"""Value rules for the `model` and `eval` sections (in `vla_dist.config.validate.CHECKS`): ranges, the
architecture a family needs, the pretrained and evaluated directories, state inputs the dataset has.
Plain functions on the RunConfig; they read the directories a config names, never load weights."""

from __future__ import annotations

import re
from pathlib import Path

from vla_dist.checkpoint_layout import is_complete, latest_checkpoint
from vla_dist.config.rules import Check, at_least, in_range, one_of
from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.models.files import (
    FAMILIES,
    FAMILY_MODEL_TYPES,
    PretrainedError,
    check_model_source,
    check_pretrained_dir,
    check_state_inputs,
)

MODEL_DTYPES = ("float32", "bfloat16")
TOKEN_MODEL_TYPES = FAMILY_MODEL_TYPES["action_tokens"]


def _model_pretrained(cfg: RunConfig) -> None:
    # load_config checks this too (with the weights); here for configs built in code.
    if cfg.model.pretrained is not None:
        try:
            check_model_source(cfg.model.pretrained)
        except PretrainedError as error:
            raise ConfigError("model.pretrained", str(error)) from None


def _model_hf_fits_family(cfg: RunConfig) -> None:
    # Catches e.g. model.family=action_tokens over the tiny-pi0 preset's PI0 architecture.
    model = cfg.model
    if model.pretrained is not None:
        return
    model_type = model.hf.get("model_type")
    if model.family == "action_tokens" and model_type not in TOKEN_MODEL_TYPES:
        raise ConfigError("model.hf", "the action_tokens family needs hf.model_type in "
                          f"{', '.join(TOKEN_MODEL_TYPES)}, "
                          f"got {model_type!r} (pick a preset of that family, e.g. model.preset=tiny-openvla)")
    if model.family == "pi0" and model_type is not None:
        raise ConfigError("model.hf", f"holds a {model_type!r} architecture, not PI0Config kwargs (pick a pi0 "
                          f"preset, e.g. model.preset=tiny-pi0)")


def _model_image_size_fits_patches(cfg: RunConfig) -> None:
    hf = cfg.model.hf
    vision = hf.get("vision_config") or (hf.get("vlm_config") or {}).get("vision_config") or {}
    patch = vision.get("patch_size")
    if isinstance(patch, int) and patch > 0 and cfg.model.image_size % patch:
        raise ConfigError("model.image_size", f"must be a multiple of the vision patch size {patch}, "
                          f"got {cfg.model.image_size}")


def _model_lora_targets(cfg: RunConfig) -> None:
    if cfg.model.lora_targets is not None:
        try:
            re.compile(cfg.model.lora_targets)
        except re.error as error:
            raise ConfigError("model.lora_targets",
                              f"not a valid regex ({error}): {cfg.model.lora_targets!r}") from None


def _model_state_inputs(cfg: RunConfig) -> None:
    """Checked against the dataset's state names when data.dir already has a manifest (a run that
    collects first is checked again when the policy is built); else the names alone."""
    if cfg.model.state_inputs is None:
        return
    known = None
    manifest = Path(cfg.data.dir) / "manifest.json"
    if manifest.is_file():
        import json

        try:
            known = json.loads(manifest.read_text(encoding="utf-8"))["state_space"]["names"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable manifest is reported by the command that reads the data
    check_state_inputs(cfg.model.state_inputs, known)


def _eval_offline_data(cfg: RunConfig) -> None:
    path = cfg.eval.offline_data
    if path is None:
        return
    if not (Path(path) / "manifest.json").is_file():
        raise ConfigError("eval.offline_data", f"{path} has no manifest.json: expected a dataset directory "
                          "(`vla-dist collect` writes one; shards + manifest.json)")
    if cfg.eval.policy != "model":
        raise ConfigError("eval.policy", f"{cfg.eval.policy!r} needs the simulator; offline evaluation "
                          "(eval.offline_data) scores a model policy")


def _eval_checkpoint(cfg: RunConfig) -> None:
    path = cfg.eval.checkpoint
    if path is None:
        return
    if (Path(path) / "vla_dist.json").is_file():
        try:  # a policy directory: whole, including an unmerged export's adapter/, before any actor starts
            check_pretrained_dir(path)
        except PretrainedError as error:
            raise ConfigError("eval.checkpoint", str(error)) from None
        return
    # A training run, its checkpoints/ or a step dir: eval exports its latest complete checkpoint.
    run_dir = Path(path).parent if Path(path).name == "checkpoints" else Path(path)
    if is_complete(path) or latest_checkpoint(run_dir) is not None:
        return
    raise ConfigError("eval.checkpoint", f"{path} is neither a saved policy directory (vla_dist.json) nor a training "
                      "run or checkpoint with a complete checkpoint; give an export, a run.dir of `vla-dist train`, "
                      "or null to evaluate the untrained model.preset")


MODEL_CHECKS: list[Check] = [
    one_of("model.family", FAMILIES),
    at_least("model.chunk_size", 1),
    at_least("model.num_inference_steps", 1),
    in_range("model.image_size", 8, 1024),
    at_least("model.max_text_tokens", 1),
    one_of("model.dtype", MODEL_DTYPES),
    at_least("eval.episodes", 1),
    one_of("eval.policy", ("model", "expert")),
    one_of("eval.seeds", ("heldout", "collection", "rl")),
    at_least("eval.action_horizon", 0),
    at_least("eval.temporal_ensemble", 0.0),
    at_least("eval.noise_level", 0.0),
    at_least("eval.num_videos", 0),
    _eval_checkpoint,
    _eval_offline_data,
    _model_lora_targets,
    _model_state_inputs,
    _model_pretrained,
    _model_hf_fits_family,
    _model_image_size_fits_patches,
]
