"""Compiled action decoding (vla_dist.kernels) against transformers' eager paths, on tiny random models.

Tolerances: pi0 actions within 1e-4 (absolute and relative; measured about 3e-7 on this CPU in
fp32, for actions of magnitude ~3); action tokens exactly equal to `generate`'s.
Compile cost: every compiled test shares the shapes of the others (and the inductor cache
directory set in conftest), so each graph is compiled cold once per machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PI0Config,
    PI0ForConditionalGeneration,
)

from vla_dist.bench.decode import (
    bench_decode,
    pi0_family,
    synthetic_pi0_inputs,
    synthetic_token_inputs,
    token_family,
)
from vla_dist.kernels import (
    FlowDecoder,
    TokenDecoder,
    bucket_batch,
    greedy_action_bins_reference,
)
from vla_dist.kernels.flow_decode import compile_options, pad_batch
from vla_dist.kernels.token_decode import generate_positions

VOCAB, IMAGE_TOKEN = 400, 399
ACTION_IDS = torch.arange(100, 356)  # bin k is token 100 + k
CAMERAS, STEPS, CHUNK, ACTION_DIM = 2, 2, 3, 2
ATOL = RTOL = 1e-4

TEXT = {"model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": VOCAB}
VISION = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 16, "patch_size": 8, "vision_use_head": False}  # 4 tokens/image


def _spread_weights(model: torch.nn.Module, std: float) -> None:
    """Random init at std 0.02 makes near-constant outputs (one token repeated): a weak test."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, std)


@pytest.fixture(scope="module")
def pi0() -> PI0ForConditionalGeneration:
    torch.manual_seed(0)
    config = PI0Config(
        vlm_config={"model_type": "paligemma", "text_config": TEXT, "vision_config": VISION, "projection_dim": 64,
                    "image_token_id": IMAGE_TOKEN},
        dit_config={"model_type": "gemma", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
        chunk_size=8, max_state_dim=8, max_action_dim=8, num_inference_steps=STEPS,
    )
    model = PI0ForConditionalGeneration(config).eval()
    _spread_weights(model, 0.1)
    return model


@pytest.fixture(scope="module")
def paligemma() -> PaliGemmaForConditionalGeneration:
    torch.manual_seed(0)
    config = PaliGemmaConfig(text_config=TEXT, vision_config=VISION, projection_dim=64, image_token_id=IMAGE_TOKEN)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _spread_weights(model, 0.2)
    return model


def pi0_inputs(model: PI0ForConditionalGeneration, batch: int) -> dict[str, torch.Tensor]:
    inputs = synthetic_pi0_inputs(model, CAMERAS)(batch)  # the bench's shapes: shared compiles
    inputs["attention_mask"][0, -3:] = 0  # a padded prompt
    if batch > 1:
        inputs["pixel_attention_mask"][1, 1] = False  # a missing camera
    return inputs


def token_inputs(
    model: PaliGemmaForConditionalGeneration, batch: int, prefix_lm: bool = False
) -> dict[str, torch.Tensor]:
    """The bench's inputs (left-padded by one token; same shapes: shared compiles), row 0 padded more.
    prefix_lm: PaliGemma's token_type_ids (bidirectional prompt), no padding. Else a causal prompt:
    generate() builds a causal mask only when the batch has padding (without padding its eager sdpa
    shortcut makes PaliGemma's prompt bidirectional; TokenDecoder's mask does not depend on padding)."""
    inputs = synthetic_token_inputs(model, CAMERAS)(batch)
    inputs["attention_mask"][0, :3] = 0
    if prefix_lm:
        inputs["attention_mask"].fill_(1)
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs


def new_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def assert_one_graph(fn: Callable[..., Any], *args: Any) -> None:
    """`fn` traces into exactly one graph with no graph break (dynamo only: no inductor compile).

    Not `torch._dynamo.explain`: it traces without fullgraph, where transformers' image-token count
    check (`torch_compilable_check`) breaks on `.item()`; with fullgraph=True, which the decoders
    use, dynamo keeps that check in the graph."""
    graphs, breaks = new_graphs(), sum(counters["graph_break"].values())
    with torch.no_grad():
        torch.compile(fn, fullgraph=True, backend="eager", dynamic=False)(*args)
    assert new_graphs() - graphs == 1
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


def test_buckets_and_padding() -> None:
    assert [bucket_batch(b) for b in (1, 2, 3, 4, 5, 17, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]
    padded = pad_batch(torch.tensor([[1.0], [2.0], [3.0]]), 4)
    assert padded.flatten().tolist() == [1.0, 2.0, 3.0, 3.0]
    # Default compile settings: CUDA graphs on a GPU, inductor's C++ wrapper on a CPU.
    assert compile_options(None, torch.device("cuda")) == {"mode": "reduce-overhead"}
    assert compile_options(None, torch.device("cpu")) == {"options": {"cpp_wrapper": True}}
    assert compile_options("default", torch.device("cuda")) == {}


def test_flow_decoder_eager_matches_sample_actions(pi0: PI0ForConditionalGeneration) -> None:
    inputs = pi0_inputs(pi0, 3)
    expected = pi0.sample_actions(num_steps=STEPS, **inputs)
    actions = FlowDecoder(pi0, STEPS, compile=False)(**inputs)
    assert actions.shape == (3, 8, 8) and expected.abs().max() > 0.5
    torch.testing.assert_close(actions, expected, atol=ATOL, rtol=RTOL)


def test_flow_decoder_compiled_once_per_bucket(pi0: PI0ForConditionalGeneration) -> None:
    decoder = FlowDecoder(pi0, STEPS, compile=True)
    # (batch, graphs dynamo compiles on this call, decoder's compiles so far): 3 opens bucket 4 (one
    # graph: prefix + all steps), 3 again and 4 reuse it. (A new bucket: the token decoder's test.)
    for batch, compiled_now, compiles in ((3, 1, 1), (3, 0, 1), (4, 0, 1)):
        inputs = pi0_inputs(pi0, batch)
        before = new_graphs()
        actions = decoder(**inputs)
        assert new_graphs() - before == compiled_now, f"batch {batch}"
        assert decoder.num_compiles == compiles
        assert actions.shape == (batch, 8, 8)
        torch.testing.assert_close(actions, pi0.sample_actions(num_steps=STEPS, **inputs), atol=ATOL, rtol=RTOL)
    assert decoder.compile_seconds > 0


def test_flow_decode_is_one_graph(pi0: PI0ForConditionalGeneration) -> None:
    decoder = FlowDecoder(pi0, STEPS, compile=False)
    inputs = pi0_inputs(pi0, 2)
    names = ("state", "input_ids", "pixel_values", "pixel_attention_mask", "attention_mask", "noise")
    assert_one_graph(decoder._decode, *(inputs[name] for name in names))


def generate_bins(model: PaliGemmaForConditionalGeneration, num_tokens: int, **inputs: torch.Tensor) -> torch.Tensor:
    """`model.generate`, greedy, every token but the action tokens masked out: bin indices."""

    class ActionTokensOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return torch.full_like(scores, float("-inf")).index_copy(1, ACTION_IDS, scores[:, ACTION_IDS])

    out = model.generate(**inputs, max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                         logits_processor=LogitsProcessorList([ActionTokensOnly()]))
    return out[:, -num_tokens:] - ACTION_IDS[0]


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_token_reference_is_generate(paligemma: PaliGemmaForConditionalGeneration, prefix_lm: bool) -> None:
    inputs = token_inputs(paligemma, 3, prefix_lm)
    bins = greedy_action_bins_reference(paligemma, ACTION_IDS, CHUNK * ACTION_DIM, **inputs)
    assert len(set(bins.flatten().tolist())) > 4  # the model does not just repeat one token
    assert torch.equal(bins, generate_bins(paligemma, CHUNK * ACTION_DIM, **inputs))


@pytest.mark.parametrize("prompt", ["causal", "prefix_lm", "policy_positions"])
def test_token_decoder_eager_matches_reference(paligemma: PaliGemmaForConditionalGeneration, prompt: str) -> None:
    inputs = token_inputs(paligemma, 3, prefix_lm=prompt != "causal")
    if prompt == "policy_positions":  # as ActionTokenPolicy.prepare_prompt: 0-based, given explicitly
        inputs["position_ids"] = generate_positions(inputs["attention_mask"], 0)
    num_tokens = CHUNK * ACTION_DIM
    bins = greedy_action_bins_reference(paligemma, ACTION_IDS, num_tokens, **inputs)
    centers = torch.linspace(-1, 1, 256)
    decoder = TokenDecoder(paligemma, ACTION_IDS, centers, num_tokens, compile=False)
    assert torch.equal(decoder(**inputs), centers[bins])


def test_token_decoder_compiled_matches_generate(paligemma: PaliGemmaForConditionalGeneration) -> None:
    num_tokens = CHUNK * ACTION_DIM
    # Per-dimension bins and an affine un-normalization: raw = 10 * normalized + dim index.
    centers = torch.stack([torch.linspace(-1, 1, 256), torch.linspace(0, 1, 256)])

    def unnormalize(x: torch.Tensor) -> torch.Tensor:
        return 10 * x + torch.arange(ACTION_DIM, dtype=x.dtype)

    decoder = TokenDecoder(paligemma, ACTION_IDS, centers, num_tokens, unnormalize=unnormalize, compile=True)
    # (batch, graphs compiled on this call): prefill, step, de-tokenize once for bucket 4, none for
    # 3 again and 4, the same three once for the new bucket 1.
    for batch, compiled_now in ((3, 3), (3, 0), (4, 0), (1, 3)):
        inputs = token_inputs(paligemma, batch)
        before = new_graphs()
        raw = decoder(**inputs)
        assert new_graphs() - before == compiled_now, f"batch {batch}"
        bins = greedy_action_bins_reference(paligemma, ACTION_IDS, num_tokens, **inputs)
        dims = torch.arange(num_tokens) % ACTION_DIM
        expected = 10 * centers[dims[None, :], bins] + dims.float()
        assert raw.shape == (batch, num_tokens)
        torch.testing.assert_close(raw, expected, atol=1e-5, rtol=0)
    assert decoder.num_compiles == 6
    # Explicit (0-based) position ids are data, not shape: no new graph.
    inputs = token_inputs(paligemma, 4)
    inputs["position_ids"] = generate_positions(inputs["attention_mask"], 0)
    before = new_graphs()
    bins = greedy_action_bins_reference(paligemma, ACTION_IDS, num_tokens, **inputs)
    torch.testing.assert_close(decoder(**inputs), 10 * centers[dims[None, :], bins] + dims.float(), atol=1e-5, rtol=0)
    assert new_graphs() == before
    # A causal prompt without padding (no generate() reference, see token_inputs): same as uncompiled.
    inputs = token_inputs(paligemma, 4)
    inputs["attention_mask"].fill_(1)
    eager = TokenDecoder(paligemma, ACTION_IDS, centers, num_tokens, unnormalize=unnormalize, compile=False)
    assert torch.equal(decoder(**inputs), eager(**inputs))


def test_token_decode_steps_are_one_graph_each(paligemma: PaliGemmaForConditionalGeneration) -> None:
    num_tokens = CHUNK * ACTION_DIM
    decoder = TokenDecoder(paligemma, ACTION_IDS, torch.linspace(-1, 1, 256), num_tokens, compile=False)
    inputs = token_inputs(paligemma, 2)
    prompt_len = inputs["input_ids"].shape[1]
    keys, values = decoder._kv_buffers(2, prompt_len)
    prompt_pos = inputs["attention_mask"].cumsum(-1)
    for token_type_ids in (None, torch.zeros_like(inputs["input_ids"])):  # causal and prefix-LM prompts
        assert_one_graph(decoder._prefill, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                         prompt_pos, token_type_ids, keys, values)
    valid = torch.ones(2, prompt_len + num_tokens, dtype=torch.bool)
    first_bin = torch.zeros(2, dtype=torch.long)
    assert_one_graph(decoder._step, first_bin, torch.tensor([prompt_len]), prompt_pos[:, -1] + 1, valid, keys, values)


def test_decode_bench_report(pi0: PI0ForConditionalGeneration, paligemma: PaliGemmaForConditionalGeneration) -> None:
    # Batch 4 only: the bucket the tests above compiled (a cache hit); the CLI measures 1 and 32.
    families = [
        pi0_family(pi0, STEPS, synthetic_pi0_inputs(pi0, CAMERAS)),
        token_family(paligemma, ACTION_IDS, torch.linspace(-1, 1, 256), CHUNK, ACTION_DIM,
                     synthetic_token_inputs(paligemma, CAMERAS)),
    ]
    report = bench_decode(families, (4,), primary="pi0")
    assert {"name", "value", "unit", "baseline", "ratio", "device"} <= set(report)
    assert report["name"] == "decode" and report["unit"] == "ms/chunk"
    row = report["details"]["pi0"]["batches"]["b4"]
    assert report["value"] == row["compiled"]["ms_per_chunk"] > 0
    assert report["baseline"] == row["hf_eager"]["ms_per_chunk"] > 0
    # The report's arithmetic, not which path won: that speed claim is `vla-dist bench decode`'s to
    # print (a few calls on shared cores time the neighbours as much as the decoders).
    assert report["ratio"] == pytest.approx(report["baseline"] / report["value"], rel=1e-2)
    assert math.isfinite(report["ratio"]) and report["ratio"] > 0
    for family, chunk in (("pi0", 8), ("action_tokens", CHUNK)):
        row = report["details"][family]["batches"]["b4"]
        assert row["max_abs_diff"] < ATOL  # compiled == transformers' eager on the bench's own inputs
        for path in ("hf_eager", "static_eager", "compiled"):
            ms = row[path]["ms_per_chunk"]
            assert math.isfinite(ms) and ms > 0
            # actions_per_s is rounded to 0.1: at a few actions/s (a starved machine) that is over 1%
            assert row[path]["actions_per_s"] == pytest.approx(4 * chunk * 1000 / ms, rel=1e-2, abs=0.06)
        assert row["speedup"] == pytest.approx(row["hf_eager"]["ms_per_chunk"] / row["compiled"]["ms_per_chunk"],
                                               rel=1e-2)


def test_decoders_on_the_policies_inputs() -> None:
    """The tiny presets through vla_dist.models: our decoders (uncompiled: the compiled graphs are
    checked above) on prepare_prefix/prepare_prompt equal the policies' own eager paths."""
    from vla_dist.config import load_config
    from vla_dist.models.build import build_policy, placeholder_manifest
    from vla_dist.models.policy import PolicyInputs

    torch.manual_seed(0)
    pi0_policy = build_policy(load_config(None, ["model.preset=tiny-pi0"]).model, placeholder_manifest()).eval()
    token_policy = build_policy(load_config(None, ["model.preset=tiny-openvla"]).model, placeholder_manifest()).eval()
    _spread_weights(token_policy.hf_model, 0.2)
    images = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    texts = ["pick up the red cube", "push the cube left now"]
    inputs = PolicyInputs(images, torch.randn(2, pi0_policy.state_dim), texts)

    prefix = pi0_policy.prepare_prefix(inputs)  # right-padded prompts
    noise = pi0_policy.full_noise(None, 2)
    steps = pi0_policy.spec.num_inference_steps
    expected = pi0_policy.hf_model.sample_actions(**prefix, noise=noise, num_steps=steps)
    actions = FlowDecoder(pi0_policy.hf_model, steps, compile=False)(**prefix, noise=noise)
    torch.testing.assert_close(actions, expected, atol=ATOL, rtol=RTOL)

    prompt = token_policy.prepare_prompt(inputs)  # left-padded, 0-based position_ids, token_type_ids
    decoder = TokenDecoder(token_policy.hf_model, token_policy.action_token_ids, token_policy.bin_centers,
                           token_policy.num_action_tokens, unnormalize=token_policy.unnormalize_actions,
                           compile=False, action_dim=token_policy.action_dim)
    raw = decoder(**prompt).reshape(2, token_policy.chunk_size, token_policy.action_dim)
    bins = token_policy.predict_bins(inputs)
    assert len(set(bins.flatten().tolist())) > 4
    torch.testing.assert_close(raw, token_policy.bins_to_actions(bins), atol=1e-6, rtol=0)


# Heavy: a cold inductor compile of each policy's decoder, ~2.5 min on 2 cores (10 s warm); the kernel tests
# above keep compiled decoding in the main suite.
@pytest.mark.heavy
@pytest.mark.parametrize("preset", ["tiny-pi0", "tiny-openvla"])
def test_policy_predicts_through_compiled_decoding(preset: str) -> None:
    """`model.compile`: predict_chunk routed through the compiled kernels gives the eager actions."""
    from vla_dist.config import load_config
    from vla_dist.models.build import build_policy, placeholder_manifest
    from vla_dist.models.policy import PolicyInputs

    torch.manual_seed(0)
    policy = build_policy(load_config(None, [f"model.preset={preset}"]).model, placeholder_manifest()).eval()
    _spread_weights(policy.hf_model, 0.2)
    images = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    inputs = PolicyInputs(images, torch.randn(2, policy.state_dim), ["pick up the red cube", "stack the red block"])
    noise = policy.make_noise(2) if hasattr(policy, "make_noise") else None
    eager = policy.predict_chunk(inputs, noise)
    policy.enable_compiled_decoding()
    assert policy.decoder is not None and "decoder" not in dict(policy.named_children())
    compiled = policy.predict_chunk(inputs, noise)
    assert compiled.shape == eager.shape == (2, policy.chunk_size, policy.action_dim)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert policy.decoder.num_compiles >= 1
