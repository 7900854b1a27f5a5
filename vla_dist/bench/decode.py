"""`vla-dist bench decode`: compiled action decoding vs eager, both model families, in one run.

value    = compiled latency per chunk at batch 1 (ms) of the configured family (model.family)
baseline = transformers' eager path at batch 1 (ms/chunk): PI0 `sample_actions`; a greedy
           DynamicCache loop over the action tokens (`greedy_action_bins_reference`, what the
           policy's eager `predict_bins` runs)
ratio    = baseline / value (the speed-up)
details[family]["batches"]["b<B>"] = latency (ms/chunk) and actions/s of `hf_eager`, `static_eager`
(our decoder uncompiled: what the static cache alone buys) and `compiled`; `compile_s` (first call
of the bucket: tracing, inductor, CUDA-graph capture; never inside a timing) and `max_abs_diff`
(compiled vs hf_eager, normalized action units). One chunk = one call: B chunks of `chunk_size`
actions. Batch sizes: 1 and bench.decode_batch when the schema has it, else 32 (CPU) / 64 (GPU).

Models: the configured policy (`build_policy(cfg.model, ...)`) for its family and the other
family's tiny preset, inputs made by the policies' own `prepare_prefix`/`prepare_prompt` from random
images, states and task instructions (preprocessing is not timed). On a GPU in bf16 with CUDA graphs;
on a CPU in fp32 with inductor's C++ wrapper.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from vla_dist.bench.common import bench_report
from vla_dist.config.schema import RunConfig
from vla_dist.kernels import (
    FlowDecoder,
    TokenDecoder,
    bucket_batch,
    greedy_action_bins_reference,
)

Inputs = dict[str, torch.Tensor]
MakeInputs = Callable[[int], Inputs]  # batch size -> the decoder's keyword arguments
TEXT_TOKENS = 16  # synthetic prompts: text tokens after the image tokens
MIN_SECONDS, MIN_REPEATS = 0.5, 3  # per timing: whichever takes longer
TINY_PRESETS = {"pi0": "tiny-pi0", "action_tokens": "tiny-openvla"}


@dataclasses.dataclass
class DecodeFamily:
    """One policy family's decode paths, over inputs built for a batch size."""

    name: str
    chunk_size: int  # actions per chunk (per sample per call)
    make_inputs: MakeInputs
    hf_eager: Callable[[Inputs], torch.Tensor]  # transformers' own path, normalized actions
    make_decoder: Callable[[bool], Callable[[Inputs], torch.Tensor]]  # ours; arg: compile


def pi0_family(model: torch.nn.Module, num_steps: int, make_inputs: MakeInputs) -> DecodeFamily:
    """make_inputs(B): state, input_ids, pixel_values, pixel_attention_mask, attention_mask, noise."""

    def make_decoder(compile: bool) -> Callable[[Inputs], torch.Tensor]:
        decoder = FlowDecoder(model, num_steps, compile=compile)
        return lambda inputs: decoder(**inputs)

    def hf_eager(inputs: Inputs) -> torch.Tensor:
        return model.sample_actions(num_steps=num_steps, **inputs)

    return DecodeFamily("pi0", model.config.chunk_size, make_inputs, hf_eager, make_decoder)


def token_family(
    model: torch.nn.Module,
    action_token_ids: torch.Tensor,
    bin_centers: torch.Tensor,
    chunk_size: int,
    action_dim: int,
    make_inputs: MakeInputs,
) -> DecodeFamily:
    """make_inputs(B): input_ids, pixel_values, attention_mask [, position_ids, token_type_ids]."""
    num_tokens = chunk_size * action_dim
    centers = bin_centers.float()

    def make_decoder(compile: bool) -> Callable[[Inputs], torch.Tensor]:
        decoder = TokenDecoder(model, action_token_ids, centers, num_tokens, compile=compile, action_dim=action_dim)
        return lambda inputs: decoder(**inputs)

    def hf_eager(inputs: Inputs) -> torch.Tensor:
        bins = greedy_action_bins_reference(model, action_token_ids, num_tokens, **inputs)
        rows = torch.arange(num_tokens, device=bins.device) % centers.shape[0] if centers.ndim == 2 else None
        on_device = centers.to(bins.device)
        token_centers = on_device[rows] if rows is not None else on_device.expand(num_tokens, -1)
        return token_centers[torch.arange(num_tokens, device=bins.device)[None, :], bins]

    return DecodeFamily("action_tokens", chunk_size, make_inputs, hf_eager, make_decoder)


def synthetic_pi0_inputs(model: torch.nn.Module, num_cameras: int) -> MakeInputs:
    """Random model-level pi0 inputs: image tokens for every camera, then TEXT_TOKENS text tokens."""
    config = model.config
    vision = config.vlm_config.vision_config
    image_tokens = num_cameras * (vision.image_size // vision.patch_size) ** 2
    param = next(model.parameters())

    def make_inputs(batch: int) -> Inputs:
        gen = torch.Generator().manual_seed(batch)
        vlm = config.vlm_config
        inputs = _prompt(batch, image_tokens, vlm.image_token_id, vlm.text_config.vocab_size, gen)
        inputs["pixel_values"] = torch.randn(batch, num_cameras, 3, vision.image_size, vision.image_size, generator=gen)
        inputs["pixel_attention_mask"] = torch.ones(batch, num_cameras, dtype=torch.bool)
        inputs["state"] = torch.randn(batch, config.max_state_dim, generator=gen)
        inputs["noise"] = torch.randn(batch, config.chunk_size, config.max_action_dim, generator=gen)
        return _to(inputs, param)

    return make_inputs


def synthetic_token_inputs(model: torch.nn.Module, num_cameras: int) -> MakeInputs:
    """Random model-level prompts for a PaliGemma-style VLM, left-padded by one token (as a server
    batching prompts of several lengths sees; it also keeps transformers' eager prompt mask causal,
    like TokenDecoder's: see there). Images flat: [B * n_cam, 3, H, W], cameras in prompt order."""
    config = model.config
    vision = config.vision_config
    image_tokens = num_cameras * (vision.image_size // vision.patch_size) ** 2
    param = next(model.parameters())

    def make_inputs(batch: int) -> Inputs:
        gen = torch.Generator().manual_seed(batch)
        inputs = _prompt(batch, image_tokens, config.image_token_id, config.get_text_config().vocab_size, gen)
        pad = torch.zeros(batch, 1, dtype=torch.long)
        inputs["input_ids"] = torch.cat([pad, inputs["input_ids"]], dim=1)
        inputs["attention_mask"] = torch.cat([pad, inputs["attention_mask"]], dim=1)
        size = vision.image_size
        inputs["pixel_values"] = torch.randn(batch * num_cameras, 3, size, size, generator=gen)
        return _to(inputs, param)

    return make_inputs


def bench_decode(families: list[DecodeFamily], batch_sizes: tuple[int, ...], primary: str) -> dict[str, Any]:
    """Measure every family at every batch size; the report of `vla-dist bench decode`."""
    details: dict[str, Any] = {}
    for family in families:
        decoders = {"static_eager": family.make_decoder(False), "compiled": family.make_decoder(True)}
        rows: dict[str, Any] = {}
        for batch in batch_sizes:
            inputs = family.make_inputs(batch)
            row: dict[str, Any] = {"batch": batch, "bucket": bucket_batch(batch)}
            started = time.perf_counter()
            compiled_out = decoders["compiled"](inputs)  # first call of the bucket: compiles
            _sync()
            row["compile_s"] = round(time.perf_counter() - started, 2)
            reference = family.hf_eager(inputs)  # also its warm-up
            row["max_abs_diff"] = float((compiled_out.float() - reference.float()).abs().max())
            paths = {"hf_eager": family.hf_eager, **decoders}
            for path, fn in paths.items():
                seconds = time_call(fn, inputs)
                row[path] = {
                    "ms_per_chunk": round(1000 * seconds, 3),
                    "actions_per_s": round(batch * family.chunk_size / seconds, 1),
                }
            row["speedup"] = round(row["hf_eager"]["ms_per_chunk"] / row["compiled"]["ms_per_chunk"], 3)
            rows[f"b{batch}"] = row
        details[family.name] = {"chunk_size": family.chunk_size, "batches": rows}

    first = details[primary]["batches"][f"b{batch_sizes[0]}"]
    value, baseline = first["compiled"]["ms_per_chunk"], first["hf_eager"]["ms_per_chunk"]
    return bench_report(
        "decode", value, "ms/chunk", baseline, round(baseline / value, 3),
        f"eager / compiled latency per chunk, {primary}, batch {batch_sizes[0]}",
        family=primary,
        batch_sizes=list(batch_sizes),
        dtype="bfloat16" if torch.cuda.is_available() else "float32",
        details=details,
    )


def run_decode_bench(cfg: RunConfig) -> dict[str, Any]:
    from vla_dist.runtime import announce_decoder_compile, apply_cache_env

    apply_cache_env(cfg.cluster.cache_dir)  # inductor's cache: a warm machine compiles in seconds
    announce_decoder_compile("compiling both families' action decoders at two batch sizes")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A large batch, as an inference server for a fleet of robots would see.
    large = int(getattr(cfg.bench, "decode_batch", 0) or (64 if device.type == "cuda" else 32))
    if importlib.util.find_spec("vla_dist.models") is not None:
        families, primary = _policy_families(cfg, device)
    else:  # without the models package: tiny HF models built here
        families, primary = _tiny_families(len(cfg.task.cameras), device), "pi0"
    return bench_decode(families, (1, large), primary)


def _policy_families(cfg: RunConfig, device: torch.device) -> tuple[list[DecodeFamily], str]:
    """The configured policy for its family, the other family's tiny preset for the other."""
    from vla_dist.config import load_config
    from vla_dist.data.manifest import ManifestError, read_manifest
    from vla_dist.models.build import build_policy, placeholder_manifest

    try:
        manifest = read_manifest(cfg.data.dir)
    except (ManifestError, OSError):
        manifest = placeholder_manifest()  # no collected data: the simulator's spaces, unit statistics
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    primary = cfg.model.family
    families = []
    for family, tiny in TINY_PRESETS.items():
        model_cfg = cfg.model if family == primary else load_config(None, [f"model.preset={tiny}"]).model
        torch.manual_seed(cfg.run.seed)
        policy = build_policy(model_cfg, manifest, device).eval()
        policy.hf_model.to(dtype)
        families.append(_pi0_from_policy(policy) if family == "pi0" else _tokens_from_policy(policy))
    return families, primary


def _pi0_from_policy(policy: Any) -> DecodeFamily:
    def make_inputs(batch: int) -> Inputs:
        inputs = policy.prepare_prefix(random_policy_inputs(policy, batch))
        gen = torch.Generator().manual_seed(batch)
        return {**inputs, "noise": policy.full_noise(policy.make_noise(batch, gen), batch)}

    return pi0_family(policy.hf_model, policy.spec.num_inference_steps, make_inputs)


def _tokens_from_policy(policy: Any) -> DecodeFamily:
    def make_inputs(batch: int) -> Inputs:
        return policy.prepare_prompt(random_policy_inputs(policy, batch))

    return token_family(policy.hf_model, policy.action_token_ids, policy.bin_centers, policy.chunk_size,
                        policy.action_dim, make_inputs)


def random_policy_inputs(policy: Any, batch: int) -> Any:
    """Random camera images and states, task instructions of several lengths (padded prompts)."""
    from vla_dist.models.policy import PolicyInputs
    from vla_dist.sim.tasks import TASKS

    gen = torch.Generator().manual_seed(batch)
    size = policy.image_size
    images = torch.randint(0, 256, (batch, len(policy.cameras), size, size, 3), generator=gen, dtype=torch.uint8)
    texts = [text for spec in TASKS.values() for text in spec.instructions]
    state = torch.randn(batch, policy.state_dim, generator=gen)
    return PolicyInputs(images, state, [texts[i % len(texts)] for i in range(batch)])


def _tiny_families(num_cameras: int, device: torch.device) -> list[DecodeFamily]:
    """Tiny randomly initialized HF models the size of the tiny presets (without vla_dist.models)."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PI0Config,
        PI0ForConditionalGeneration,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text = {"model_type": "gemma", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 600}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "vision_use_head": False}
    vlm = {"text_config": text, "vision_config": vision, "projection_dim": 128, "image_token_id": 599}
    expert = {"model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
    torch.manual_seed(0)
    pi0 = PI0ForConditionalGeneration(PI0Config(vlm_config={"model_type": "paligemma", **vlm}, dit_config=expert,
                                                chunk_size=8, num_inference_steps=10))
    pi0 = pi0.to(device=device, dtype=dtype).eval()
    tokens = PaliGemmaForConditionalGeneration(PaliGemmaConfig(**vlm)).to(device=device, dtype=dtype).eval()
    chunk, action_dim = 4, 7
    edges = torch.linspace(-1.0, 1.0, 257)
    return [
        pi0_family(pi0, 10, synthetic_pi0_inputs(pi0, num_cameras)),
        token_family(tokens, torch.arange(300, 556), (edges[:-1] + edges[1:]) / 2, chunk, action_dim,
                     synthetic_token_inputs(tokens, num_cameras)),
    ]


def _prompt(batch: int, image_tokens: int, image_token_id: int, vocab: int, gen: torch.Generator) -> Inputs:
    text = torch.randint(1, min(vocab, 256), (batch, TEXT_TOKENS), generator=gen)
    images = torch.full((batch, image_tokens), image_token_id, dtype=torch.long)
    input_ids = torch.cat([images, text], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _to(inputs: Inputs, like: torch.Tensor) -> Inputs:
    return {k: v.to(like.device, like.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[Inputs], Any], inputs: Inputs) -> float:
    """Median seconds per call over at least MIN_REPEATS calls and MIN_SECONDS (after one warm-up)."""
    fn(inputs)
    _sync()
    times: list[float] = []
    deadline = time.perf_counter() + MIN_SECONDS
    while len(times) < MIN_REPEATS or time.perf_counter() < deadline:
        started = time.perf_counter()
        fn(inputs)
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


if __name__ == "__main__":  # python -m vla_dist.bench.decode [key=value ...]: the default config
    import json
    import sys

    from vla_dist.config import load_config, validate

    config = validate(load_config(None, sys.argv[1:]))
    print(json.dumps(run_decode_bench(config)))
