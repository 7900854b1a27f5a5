"""The on-disk layout of a saved policy, and checks that a directory holds a loadable one.

A policy directory (written by `VLAPolicy.save_pretrained`, read by `load_policy`):
    config.json, model.safetensors (or model.safetensors.index.json + shards)   the transformers model
    tokenizer.json, tokenizer_config.json                                       the tokenizer
    normalization.json                                                          dataset statistics
    vla_dist.json                                                               family, chunk size, cameras, ...
    adapter/adapter_config.json, adapter/adapter_model.safetensors             optional: a peft LoRA adapter
                                                                                (`vla-dist export` without
                                                                                --merge-lora); part of the policy:
                                                                                `load_policy` merges it on load

Importing this module loads no torch: `check_pretrained_dir` (structure, JSON, safetensors headers)
runs while the config is loaded, so a broken `model.pretrained` fails before any heavy work.
`check_weights_match` compares the weights with the architecture in config.json on the meta device;
it imports transformers when called.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vla_dist.errors import ConfigError

SPEC_FILE = "vla_dist.json"
ADAPTER_DIR = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SPEC_VERSION = 1
# The model families, each with the config.json model_types its policies hold: the one list (config
# validation, policy-directory checks, models/policy.py's family classes and action_tokens.py read it).
FAMILY_MODEL_TYPES: dict[str, tuple[str, ...]] = {"pi0": ("pi0",), "action_tokens": ("paligemma", "llava")}
FAMILIES = tuple(FAMILY_MODEL_TYPES)
# config.json model_type -> the transformers class that holds it (explicit: no lookup by convention)
HF_CLASSES = {
    "pi0": "PI0ForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}
_SPEC_FIELDS = ("family", "chunk_size", "action_dim", "state_dim", "cameras", "image_size", "max_text_tokens")
_REQUIRED_FILES = ("config.json", SPEC_FILE, "normalization.json", "tokenizer.json")


class PretrainedError(ValueError):
    """A policy directory that cannot be loaded; the message names the file (and key) at fault."""


def weights_readable_like(directory: str | os.PathLike[str], like: str | os.PathLike[str]) -> None:
    """transformers and peft write `*.safetensors` through a private temporary file, so the weights
    end up mode 0600 while every other file is 0644: on a shared cluster, other users and nodes could
    not read them. Give them the mode of `like`, a file written beside them the ordinary way (the
    process umask decides, as for every other output)."""
    for path in Path(directory).glob("*.safetensors"):
        shutil.copymode(like, path)


def check_pretrained_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the layout of a policy directory; return its vla_dist.json. Raises PretrainedError."""
    root = Path(path)
    if not root.is_dir():
        raise PretrainedError(f"{root} is not a directory (expected a policy saved by vla-dist)")
    for name in _REQUIRED_FILES:
        if not (root / name).is_file():
            raise PretrainedError(f"{root / name} is missing (a saved policy holds {', '.join(_REQUIRED_FILES)})")
    spec = _read_json(root / SPEC_FILE)
    missing = [key for key in _SPEC_FIELDS if key not in spec]
    if missing:
        raise PretrainedError(f"{root / SPEC_FILE} lacks key(s) {missing}")
    if spec["family"] not in FAMILIES:
        raise PretrainedError(f"{root / SPEC_FILE}: family {spec['family']!r} is not one of {', '.join(FAMILIES)}")
    model_type = _read_json(root / "config.json").get("model_type")
    if model_type not in FAMILY_MODEL_TYPES[spec["family"]]:
        raise PretrainedError(
            f"{root / 'config.json'}: model_type {model_type!r} does not fit family {spec['family']!r} "
            f"(expected {' or '.join(FAMILY_MODEL_TYPES[spec['family']])})"
        )
    _read_json(root / "normalization.json")
    weight_shapes(root)  # every safetensors file exists and has a readable header
    check_adapter_dir(root)
    return spec


def is_foundation_dir(path: str | os.PathLike[str]) -> bool:
    """A plain transformers checkpoint (config.json, no vla_dist.json): a pretrained model as
    published, which post-training starts from with the dataset's statistics and dims."""
    root = Path(path)
    return (root / "config.json").is_file() and not (root / SPEC_FILE).is_file()


# Plain checkpoints post-training can start from, by config.json model_type: a pi0 policy, or a
# VLM that becomes the action-token family's backbone (its 256 action tokens are added to the
# vocabulary as it loads: models/action_tokens.py).
FOUNDATION_FAMILIES = {"pi0": "pi0", "paligemma": "action_tokens", "llava": "action_tokens"}
FOUNDATION_TOKENIZER = "tokenizer.json"


def check_model_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`model.pretrained`: a policy saved by vla-dist (its vla_dist.json returned) or a plain
    transformers checkpoint ({"family": ..., "foundation": True}). Torch-free. Raises PretrainedError."""
    if not is_foundation_dir(path):
        return check_pretrained_dir(path)
    root = Path(path)
    model_type = _read_json(root / "config.json").get("model_type")
    if model_type not in FOUNDATION_FAMILIES:
        supported = ", ".join(FOUNDATION_FAMILIES)
        raise PretrainedError(f"{root / 'config.json'}: a plain transformers checkpoint of model_type {model_type!r} "
                              f"cannot start post-training; plain checkpoints of model_type {supported} can, "
                              f"and so can any policy directory saved by vla-dist (with {SPEC_FILE})")
    if not (root / FOUNDATION_TOKENIZER).is_file():
        raise PretrainedError(f"{root / FOUNDATION_TOKENIZER} is missing: a plain checkpoint needs its fast tokenizer "
                              "beside it (tokenizer.save_pretrained writes it; a sentencepiece tokenizer.model alone "
                              "converts with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(...))")
    weight_shapes(root)  # every safetensors file exists and has a readable header
    return {"family": FOUNDATION_FAMILIES[model_type], "foundation": True}


def foundation_architecture(path: str | os.PathLike[str]) -> dict[str, int]:
    """The policy keys a plain checkpoint fixes, read through transformers' config class (which
    fills the defaults config.json leaves out): its image size, and for pi0 its chunk size (a VLM
    backbone has none: the config's model.chunk_size holds). Imports transformers."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type == "pi0":
        return {"chunk_size": int(config.chunk_size), "image_size": int(config.vlm_config.vision_config.image_size)}
    return {"image_size": int(config.vision_config.image_size)}


def check_state_inputs(names: Sequence[str], known: Sequence[str] | None) -> None:
    """model.state_inputs: distinct names, each a state dim of the dataset (`known`, its manifest's
    state_space names; None when no dataset is there yet: then only the names themselves), or none at
    all ([]: the policy reads its cameras and the instruction only). Torch-free, so config validation
    and policy building share it. Raises ConfigError."""
    unknown = [name for name in names if name not in known] if known is not None else []
    if unknown or len(set(names)) != len(names):
        raise ConfigError("model.state_inputs", f"{list(names)}: need null (every state dim), [] (none) or "
                          f"distinct names of the dataset's state dims {list(known or [])}"
                          + (f"; unknown: {unknown}" if unknown else ""))


def check_adapter_dir(root: Path) -> Path | None:
    """root/adapter when the policy has one (an unmerged LoRA export), checked whole; else None.
    A half-copied adapter must fail here: loading the base alone would evaluate the wrong policy."""
    adapter = root / ADAPTER_DIR
    if not adapter.exists():
        return None
    for name in ADAPTER_FILES:
        if not (adapter / name).is_file():
            raise PretrainedError(f"{adapter / name} is missing (a LoRA adapter holds {', '.join(ADAPTER_FILES)})")
    _read_json(adapter / "adapter_config.json")
    _safetensors_header(adapter / "adapter_model.safetensors")
    return adapter


def weight_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors header(s) of a policy directory, without reading
    the tensors (the header is 8 bytes of length + JSON)."""
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise PretrainedError(f"{index} lacks a 'weight_map' object")
        files = [root / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise PretrainedError(f"{file} is missing (listed in {index})")
    else:
        raise PretrainedError(f"{single} is missing (and no {index.name}): no model weights in {root}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(_safetensors_header(file))
    return shapes


def check_weights_match(path: str | os.PathLike[str]) -> None:
    """Load the weights onto the meta device (no memory) through transformers' own loader, which
    applies its checkpoint key renamings and weight tying, and refuse any missing, unexpected or
    mis-shaped key: transformers would only warn and initialize such weights at random.
    Raises PretrainedError naming the file and the first bad key."""
    root = Path(path)
    raise_on_bad_keys(root, load_hf_model(root, device_map="meta")[1])


def raise_on_bad_keys(root: Path, info: dict[str, Any]) -> None:
    """Raise PretrainedError for the first missing/unexpected/mis-shaped key in a loading info."""
    weights = root / ("model.safetensors" if (root / "model.safetensors").is_file() else "model.safetensors.index.json")
    problems = {
        "missing_keys": "lacks key {key!r} that {config} needs",
        "unexpected_keys": "has key {key!r} unknown to {config}",
        "mismatched_keys": "has key {key!r} with a shape {config} does not take",
    }
    for kind, message in problems.items():
        keys = sorted(str(entry[0] if isinstance(entry, tuple) else entry) for entry in info.get(kind) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise PretrainedError(f"{weights} " + message.format(key=keys[0], config=root / "config.json") + more)


def load_hf_model(root: Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """(the transformers model in `root`, its loading info), with load reports kept quiet: the
    caller decides what a missing or unexpected key means."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    if config.model_type not in HF_CLASSES:
        raise PretrainedError(
            f"{root / 'config.json'}: model_type {config.model_type!r} is not one of {', '.join(HF_CLASSES)}")
    model_class = getattr(transformers, HF_CLASSES[config.model_type])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        # use_kernels=False: from 5.25 transformers swaps layers for Hub kernels by default, fetched over the
        # network (none at run time here) and refusing the meta device check_weights_match loads onto
        return model_class.from_pretrained(str(root), local_files_only=True, output_loading_info=True,
                                           ignore_mismatched_sizes=True, use_kernels=False, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        raise PretrainedError(f"{root}: transformers cannot load it: {str(error).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def _safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise PretrainedError(f"{file} is truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > os.path.getsize(file) - 8:
                raise PretrainedError(f"{file} is truncated or not a safetensors file")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PretrainedError(f"{file}: unreadable safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise PretrainedError(f"{file}: the safetensors header is not an object")
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PretrainedError(f"{file}: unreadable JSON: {error}") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{file}: expected a JSON object")
    return data
