"""Processors shared by the model families: images, text (a locally built tokenizer), normalization.

Everything here is built from local data only (the manifest, the task instructions): nothing is
downloaded, so a run works offline and a test needs no hub access. No torchvision: installing it
beside the CPU torch build breaks transformers' PI0 import (see shared notes), so resizing is
`torch.nn.functional.interpolate`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vla_dist.spaces import CORE_TASKS, TASK_INSTRUCTIONS

NORMALIZATION_FILE = "normalization.json"
PAD, BOS, EOS, IMAGE = "<pad>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)  # ids 0..3, in this order, in every tokenizer built here
NUM_ACTION_BINS = 256
ACTION_TOKENS = tuple(f"<act_{i:03d}>" for i in range(NUM_ACTION_BINS))
# OpenVLA's prompt; both families use it so one tokenizer corpus covers every prompt.
PROMPT_TEMPLATE = "What action should the robot take to {instruction}?\n"
# Words beyond the task instructions, so a paraphrased instruction still gets sensible merges.
EXTRA_WORDS = (
    "pick place put push pull lift raise lower move slide stack open close grasp grab release drop set "
    "the a an on onto in into to of off up down left right top bottom front back near far next "
    "red green blue yellow black white cube block disk circle target mark table bowl drawer "
    "it one and then with from by gently quickly 0 1 2 3 4 5 6 7 8 9"
)
_BPE_VOCAB = 1024  # BPE merges stop well below this on our small corpus; it is an upper bound


# --- images ------------------------------------------------------------------------------------


def preprocess_images(images: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, n_cam, H, W, 3] -> `dtype` [B, n_cam, 3, size, size] in [-1, 1] (SigLIP convention:
    (x / 255 - 0.5) / 0.5). Resized with antialiased bilinear interpolation when H, W != size."""
    if images.dim() != 5 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, n_cam, H, W, 3], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (as stored in shards), got {images.dtype}")
    batch, cams, height, width, _ = images.shape
    pixels = images.permute(0, 1, 4, 2, 3).reshape(batch * cams, 3, height, width).float()
    if (height, width) != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    pixels = (pixels / 255.0 - 0.5) / 0.5
    return pixels.clamp(-1.0, 1.0).reshape(batch, cams, 3, size, size).to(dtype)


# --- text --------------------------------------------------------------------------------------


def instruction_corpus() -> list[str]:
    """The red cube's task instructions as the prompt the model sees, plus a line of extra words.

    Only CORE_TASKS: the blue-cube tasks' phrasings are theirs with the colour changed, and every word
    of them is already a token (the extra words hold the colours; tests/test_models.py checks), so
    leaving them out keeps every tokenizer built here the one every earlier policy was trained with."""
    lines = [PROMPT_TEMPLATE.format(instruction=text) for task in CORE_TASKS for text in TASK_INSTRUCTIONS[task]]
    return [*lines, EXTRA_WORDS]


def build_tokenizer(corpus: Iterable[str] | None = None, *, action_tokens: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on `corpus` (default: `instruction_corpus()`).

    Special tokens <pad>, <bos>, <eos>, <image> get ids 0..3; with `action_tokens`, the 256 action-bin
    tokens <act_000>..<act_255> are appended with consecutive ids. Byte-level: any text encodes, also
    instructions never seen in training. Deterministic for a given corpus (same ids every build)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus if corpus is not None else instruction_corpus()), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS, extra_special_tokens={"image_token": IMAGE}
    )
    if action_tokens:
        added = [AddedToken(token, special=True, normalized=False) for token in ACTION_TOKENS]
        tokenizer.add_tokens(added, special_tokens=True)
    return tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved next to a model (local files only)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def token_id(tokenizer: Any, token: str) -> int:
    """The id of a token that must exist (a missing one would silently map to unk/None)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or tokenizer.convert_ids_to_tokens(ids[0]) != token:
        raise ValueError(f"tokenizer has no {token!r} token")
    return int(ids[0])


def encode_instructions(tokenizer: Any, instructions: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each instruction's prompt (PROMPT_TEMPLATE), cut to `max_tokens` (keeping the
    start, where the instruction is; the cut drops the trailing '?\\n')."""
    prompts = [PROMPT_TEMPLATE.format(instruction=text.strip()) for text in instructions]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [list(ids[:max_tokens]) for ids in encoded]


def pack_prompts(
    tokenizer: Any,
    instructions: Sequence[str],
    max_text_tokens: int,
    prefix: list[int],
    length: int,
    left_pad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask`, long [B, length]: `prefix` (image tokens, <bos>) then each
    instruction's tokens, padded with the tokenizer's pad id on the left (so generation continues
    right after the prompt) or on the right. Fixed `length` keeps compiled shapes static."""
    input_ids = torch.full((len(instructions), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(instructions), length), dtype=torch.long)
    for row, ids in enumerate(encode_instructions(tokenizer, instructions, max_text_tokens)):
        tokens = torch.tensor(prefix + ids)
        span = slice(length - len(tokens), length) if left_pad else slice(0, len(tokens))
        input_ids[row, span] = tokens
        attention_mask[row, span] = 1
    return input_ids, attention_mask


# --- normalization -----------------------------------------------------------------------------


@dataclass
class Normalization:
    """Dataset statistics the policy normalizes with, saved as normalization.json beside the model.

    Actions map [q01, q99] -> [-1, 1] per dimension (clipped: the 1% tails are outliers we do not
    want to fit); state is standardized with mean/std. A dimension with (almost) no spread maps to 0
    and back to its constant, instead of dividing by ~0."""

    action_q01: list[float]
    action_q99: list[float]
    state_mean: list[float]
    state_std: list[float]

    EPS = 1e-6

    def __post_init__(self) -> None:
        if len(self.action_q01) != len(self.action_q99) or len(self.state_mean) != len(self.state_std):
            raise ValueError("normalization: q01/q99 and mean/std must have equal lengths")
        for name in ("action_q01", "action_q99", "state_mean", "state_std"):
            values = [float(v) for v in getattr(self, name)]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"normalization: {name} holds non-finite values")
            setattr(self, name, values)

    @property
    def action_dim(self) -> int:
        return len(self.action_q01)

    @property
    def state_dim(self) -> int:
        return len(self.state_mean)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Normalization:
        """From a data directory's manifest (`action_stats`/`state_stats` with q01/q99/mean/std)."""
        try:
            actions, state = manifest["action_stats"], manifest["state_stats"]
            return cls(list(actions["q01"]), list(actions["q99"]), list(state["mean"]), list(state["std"]))
        except KeyError as missing:
            raise ValueError(f"manifest lacks normalization statistics: {missing}") from None

    def to_json(self) -> str:
        return json.dumps({"format_version": 1, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Normalization:
        data = json.loads(text)
        data.pop("format_version", None)
        return cls(**data)

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        path = Path(out_dir) / NORMALIZATION_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> Normalization:
        return cls.from_json((Path(model_dir) / NORMALIZATION_FILE).read_text(encoding="utf-8"))

    def tensors(self) -> dict[str, torch.Tensor]:
        """float32 tensors for module buffers: action_low/high [A], action_scale [A] (half the range,
        0 where a dim is constant), state_mean/std [S] (std 1 where a dim is constant)."""
        low, high = torch.tensor(self.action_q01), torch.tensor(self.action_q99)
        half = (high - low) / 2
        std = torch.tensor(self.state_std)
        return {
            "action_low": low,
            "action_high": high,
            "action_scale": torch.where(half > self.EPS, half, torch.zeros_like(half)),
            "state_mean": torch.tensor(self.state_mean),
            "state_std": torch.where(std > self.EPS, std, torch.ones_like(std)),
        }


def normalize_actions(actions: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """raw [..., A] -> [-1, 1] (clipped); constant dims (scale 0) -> 0."""
    centre = low + scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, (actions - centre) / safe, torch.zeros_like(actions)).clamp(-1.0, 1.0)


def unnormalize_actions(norm: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[-1, 1] [..., A] (clipped first) -> raw units in [low, high] = [q01, q99] (clamped again:
    low + s - s can miss low by a rounding step)."""
    raw = low + scale + norm.clamp(-1.0, 1.0) * scale
    return torch.minimum(torch.maximum(raw, low), high)
