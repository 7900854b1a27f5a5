"""Policies: both families at tiny size on real transformers/peft models, full-size presets on meta."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: every file is built locally

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vla_dist.config import ConfigError, load_config
from vla_dist.config.schema import ModelSection
from vla_dist.models import processing
from vla_dist.models.action_tokens import ActionTokenPolicy
from vla_dist.models.build import build_policy, count_parameters, load_policy
from vla_dist.models.pi0 import PI0Policy
from vla_dist.models.policy import PolicyBatch, PolicyInputs, VLAPolicy
from vla_dist.sim.tasks import TASKS

ACTION_DIM, STATE_DIM, IMAGE_SIZE = 7, 15, 64
PRESETS = {"pi0": "tiny-pi0", "action_tokens": "tiny-openvla"}
STATE_NAMES = [f"s{i}" for i in range(STATE_DIM)]
# A toy LLaVA: the openvla-7b preset's code path (Llama causal LM, SigLIP, full feature select).
TINY_LLAVA_HF: dict[str, Any] = {
    "model_type": "llava", "vision_feature_layer": -2, "vision_feature_select_strategy": "full",
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "vision_use_head": False},
}


def synthetic_manifest() -> dict[str, Any]:
    """The manifest fields a policy reads, for 7-dim actions and 15-dim state, with spread-out stats
    (one constant action dim, as a gripper that never moves would give)."""
    gen = torch.Generator().manual_seed(0)

    def stats(dim: int, constant: int | None = None) -> dict[str, list[float]]:
        mean = torch.randn(dim, generator=gen) * 0.1
        half = torch.rand(dim, generator=gen) * 0.5 + 0.05
        if constant is not None:
            half[constant] = 0.0
        return {"mean": mean.tolist(), "std": (half / 2).tolist(), "min": (mean - 2 * half).tolist(),
                "max": (mean + 2 * half).tolist(), "q01": (mean - half).tolist(), "q99": (mean + half).tolist()}

    return {
        "cameras": ["front", "wrist"], "image_size": IMAGE_SIZE, "tasks": {name: 1 for name in TASKS},
        "action_space": {"dim": ACTION_DIM}, "state_space": {"dim": STATE_DIM, "names": STATE_NAMES},
        "action_stats": stats(ACTION_DIM, constant=5), "state_stats": stats(STATE_DIM),
    }


def manifest_action_range() -> tuple[torch.Tensor, torch.Tensor]:
    """(q01, q99) float64 [A] as the manifest states them, not as a policy stores them."""
    stats = synthetic_manifest()["action_stats"]
    return torch.tensor(stats["q01"], dtype=torch.float64), torch.tensor(stats["q99"], dtype=torch.float64)


def hand_normalize(actions: torch.Tensor) -> torch.Tensor:
    """raw -> [-1, 1] by hand: q01 -> -1, q99 -> 1 linearly, clipped; a constant dim (q01 = q99) -> 0."""
    q01, q99 = manifest_action_range()
    width = q99 - q01
    norm = 2 * (actions.double() - q01) / torch.where(width > 0, width, 1) - 1
    return torch.where(width > 0, norm.clamp(-1, 1), 0)


def hand_unnormalize(norm: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> raw by hand: clipped to [-1, 1], then -1 -> q01, 1 -> q99 linearly (float64)."""
    q01, q99 = manifest_action_range()
    return q01 + (norm.double().clamp(-1, 1) + 1) / 2 * (q99 - q01)


def bin_centres(bins: torch.Tensor) -> torch.Tensor:
    """Bin b of 256 equal bins over [-1, 1] has its centre at -1 + (2b + 1) / 256."""
    return -1 + (2 * bins.double() + 1) / 256


def expected_chunk(policy: VLAPolicy, inputs: PolicyInputs, noise: torch.Tensor) -> torch.Tensor:
    """What predict_chunk must return, from the family's raw decoder output un-normalized by hand with
    the manifest's statistics: pi0's sample_actions from the same noise (zero-padded to the model's
    width), or the greedy bins' centres."""
    with torch.no_grad():
        if isinstance(policy, PI0Policy):
            padded = torch.nn.functional.pad(noise, (0, policy.max_action_dim - ACTION_DIM)).to(policy.dtype)
            norm = policy.hf_model.sample_actions(**policy.prepare_prefix(inputs), noise=padded,
                                                  num_steps=policy.spec.num_inference_steps)[..., :ACTION_DIM]
        else:
            assert isinstance(policy, ActionTokenPolicy)
            norm = bin_centres(policy.predict_bins(inputs))
    return hand_unnormalize(norm.float())


def make_batch(policy: VLAPolicy, size: int = 4, seed: int = 1) -> PolicyBatch:
    """Random images/state, actions spread over (a bit beyond) [q01, q99]; sample 1 ends mid-chunk."""
    gen = torch.Generator().manual_seed(seed)
    low, high = policy.action_low, policy.action_high
    actions = low + (high - low) * (torch.rand(size, policy.chunk_size, ACTION_DIM, generator=gen) * 1.2 - 0.1)
    mask = torch.ones(size, policy.chunk_size, dtype=torch.bool)
    mask[min(1, size - 1), policy.chunk_size // 2 :] = False
    instructions = [spec.instructions[i % 4] for i, spec in enumerate(TASKS.values())]
    return PolicyBatch(
        images=torch.randint(0, 256, (size, 2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=gen),
        state=torch.randn(size, STATE_DIM, generator=gen),
        instructions=[instructions[i % len(instructions)] for i in range(size)],
        actions=actions, action_mask=mask,
    )


def model_cfg(preset: str, *overrides: str) -> ModelSection:
    return load_config(None, [f"model.preset={preset}", *overrides]).model


def build(family: str, hf: dict[str, Any] | None = None, seed: int = 0, **fields: Any) -> VLAPolicy:
    cfg = model_cfg(PRESETS[family])
    for key, value in fields.items():
        setattr(cfg, key, value)
    if hf is not None:
        cfg.hf = hf
    torch.manual_seed(seed)
    return build_policy(cfg, synthetic_manifest())


def loss_of(policy: VLAPolicy, batch: PolicyBatch, fixed: dict[str, torch.Tensor]) -> torch.Tensor:
    # pi0's loss draws noise and time: fixed ones make losses comparable across steps
    return policy.compute_loss(batch, **fixed) if isinstance(policy, PI0Policy) else policy.compute_loss(batch)


def fixed_draws(policy: VLAPolicy, size: int) -> dict[str, torch.Tensor]:
    if not isinstance(policy, PI0Policy):
        return {}
    gen = torch.Generator().manual_seed(7)
    return {"noise": torch.randn(size, policy.chunk_size, ACTION_DIM, generator=gen),
            "timestep": torch.rand(size, generator=gen) * 0.9 + 0.05}


@pytest.fixture(scope="module", params=list(PRESETS))
def policy(request: pytest.FixtureRequest) -> VLAPolicy:
    return build(request.param)


# --- both families ---------------------------------------------------------------------------


def test_forward_backward_finite(policy: VLAPolicy) -> None:
    model = copy.deepcopy(policy)
    loss = model.compute_loss(make_batch(model))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {name: p.grad for name, p in model.hf_model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), "a parameter got no/NaN grad"
    assert any("vision_tower" in name and g.abs().sum() > 0 for name, g in grads.items())  # images matter
    if isinstance(model, PI0Policy):  # what pi0 never reads or discards is frozen
        frozen = {name for name, p in model.hf_model.named_parameters() if not p.requires_grad}
        assert frozen == {*model.unused_parameters(), *model.discarded_parameters()}
        assert "model.dit.embed_tokens.weight" in frozen and len(frozen) == 8  # + q, o, 3 MLP, 2 norms


def test_overfits_a_fixed_batch(policy: VLAPolicy) -> None:
    model = copy.deepcopy(policy)
    batch = make_batch(model)
    fixed = fixed_draws(model, 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start = loss_of(model, batch, fixed).item()
    for _ in range(30):
        optimizer.zero_grad()
        loss_of(model, batch, fixed).backward()  # pi0: one noise/time draw, a fixed regression target
        optimizer.step()
    end = loss_of(model, batch, fixed).item()
    assert end < 0.7 * start, (start, end)  # measured: pi0 1.43 -> 0.74, tokens 6.6 -> 0.28


def test_padded_steps_do_not_count(policy: VLAPolicy) -> None:
    batch = make_batch(policy)
    fixed = fixed_draws(policy, 4)
    if isinstance(policy, PI0Policy):
        # pi0's action block attends bidirectionally, so padded inputs do reach valid outputs (as in
        # lerobot/openpi); what must hold is that padded steps and padded dims carry no loss.
        model = copy.deepcopy(policy)
        outputs: list[torch.Tensor] = []
        model.hf_model.action_out_proj.register_forward_hook(
            lambda _m, _i, out: outputs.append(out) or out.retain_grad())
        loss_of(model, batch, fixed).backward()
        grad = outputs[0].grad
        assert grad is not None and grad[:, :, :ACTION_DIM][batch.action_mask].abs().sum() > 0
        assert (grad[~batch.action_mask] == 0).all() and (grad[:, :, ACTION_DIM:] == 0).all()
        return
    changed = copy.copy(batch)
    changed.actions = batch.actions.clone()
    changed.actions[~batch.action_mask] = policy.action_high  # what lies beyond the episode's end
    with torch.no_grad():
        assert torch.equal(loss_of(policy, batch, fixed), loss_of(policy, changed, fixed))
        if isinstance(policy, ActionTokenPolicy):
            assert torch.equal(policy.log_prob(batch), policy.log_prob(changed))


def test_predict_chunk_is_the_decoder_output_un_normalized(policy: VLAPolicy) -> None:
    """predict_chunk = the raw decoder's normalized actions mapped to [q01, q99] with the manifest's
    statistics (reference computed by hand in float64); the constant action dim gives its one value."""
    batch = make_batch(policy)
    inputs = PolicyInputs(batch.images, batch.state, batch.instructions)
    noise = torch.randn(4, policy.chunk_size, ACTION_DIM, generator=torch.Generator().manual_seed(2))
    chunk = policy.predict_chunk(inputs, noise)
    assert chunk.shape == (4, policy.chunk_size, ACTION_DIM) and chunk.dtype == torch.float32
    torch.testing.assert_close(chunk.double(), expected_chunk(policy, inputs, noise), rtol=0, atol=1e-6)
    assert (chunk[..., 5] == synthetic_manifest()["action_stats"]["q01"][5]).all()
    if isinstance(policy, ActionTokenPolicy):  # every prediction sits on one of the 256 bin centres
        centres = hand_unnormalize(bin_centres(torch.arange(256))[:, None].expand(256, ACTION_DIM))
        distance = (chunk.double()[..., None, :] - centres).abs().min(dim=-2).values
        assert (distance < 1e-6).all()
    log_prob = policy.log_prob(batch)
    assert log_prob.shape == (4,) and torch.isfinite(log_prob).all()


def test_save_and_load_give_identical_predictions(policy: VLAPolicy, tmp_path: Path) -> None:
    batch = make_batch(policy, size=2)
    noise = torch.randn(2, policy.chunk_size, ACTION_DIM)
    policy.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "normalization.json", "vla_dist.json"} <= files
    spec = json.loads((tmp_path / "vla_dist.json").read_text())
    assert (spec["family"], spec["chunk_size"]) == (policy.family, policy.chunk_size)
    assert spec["cameras"] == ["front", "wrist"]
    loaded = load_policy(tmp_path)
    assert type(loaded) is type(policy)
    assert torch.equal(loaded.predict_chunk(batch, noise), policy.predict_chunk(batch, noise))


def test_saved_weights_are_readable_like_every_other_file(policy: VLAPolicy, tmp_path: Path) -> None:
    """transformers and peft write *.safetensors through a 0600 temp file: on a shared cluster other
    users and nodes could not read an export. The full model and a LoRA adapter, saved as export and
    training do: every file gets the mode the umask gives (0644 under 022)."""
    from vla_dist.config.schema import LoraSection
    from vla_dist.train.lora import apply_lora, save_adapter

    previous = os.umask(0o022)
    try:
        policy.save_pretrained(tmp_path / "policy")
        adapted = apply_lora(copy.deepcopy(policy), LoraSection(enabled=True))
        save_adapter(adapted, tmp_path / "adapter", rank=0)  # not partitioned: no collective needed
    finally:
        os.umask(previous)
    for directory, weights in ((tmp_path / "policy", "model.safetensors"),
                               (tmp_path / "adapter", "adapter_model.safetensors")):
        modes = {path.name: oct(path.stat().st_mode & 0o777) for path in directory.iterdir()}
        assert weights in modes and set(modes.values()) == {"0o644"}, modes


def test_bfloat16_keeps_exact_statistics(policy: VLAPolicy) -> None:
    cfg = model_cfg(PRESETS[policy.family], "model.dtype=bfloat16")
    model = build_policy(cfg, synthetic_manifest())
    assert model.dtype == torch.bfloat16 and model.action_low.dtype == torch.float32
    model.bfloat16()  # as DeepSpeed's bf16 mode does to the whole module
    assert torch.equal(model.action_low, policy.action_low)
    batch = make_batch(model, size=2)
    assert torch.isfinite(model.compute_loss(batch))
    noise = torch.randn(2, model.chunk_size, ACTION_DIM, generator=torch.Generator().manual_seed(4))
    # un-normalized with the float32 statistics (bf16 ones would be off by ~1e-3 here)
    torch.testing.assert_close(model.predict_chunk(batch, noise).double(), expected_chunk(model, batch, noise),
                               rtol=0, atol=1e-6)


# pi0: 2 expert layers x 7 projections, backbone layer 0 x 7, the last backbone layer's k/v only
@pytest.mark.parametrize(("family", "count"), [("pi0", 23), ("action_tokens", 14)])
def test_lora_wraps_only_the_language_models(family: str, count: int) -> None:
    import re

    from peft import LoraConfig, get_peft_model

    model = build(family)
    targets = model.lora_target_modules()
    assert isinstance(targets, str)
    declared = {name for name, module in model.hf_model.named_modules()
                if isinstance(module, torch.nn.Linear) and re.fullmatch(targets, name)}
    model.hf_model = get_peft_model(model.hf_model, LoraConfig(r=4, target_modules=targets))
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.hf_model.named_modules()
               if hasattr(module, "lora_A")}
    assert wrapped == declared and len(wrapped) == count
    assert not any("vision" in name for name in wrapped)
    assert all(name.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
               for name in wrapped)
    trainable = {name for name, p in model.hf_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    batch = make_batch(model, size=2)  # the policy works with the peft-wrapped model in place
    model.compute_loss(batch).backward()
    assert all(p.grad is not None for name, p in model.hf_model.named_parameters() if p.requires_grad)
    assert model.predict_chunk(batch).shape == (2, model.chunk_size, ACTION_DIM)


# --- pi0 -------------------------------------------------------------------------------------


def test_pi0_prefix_layout() -> None:
    model = build("pi0")
    assert isinstance(model, PI0Policy)
    prefix = model.prepare_prefix(make_batch(model, size=3))
    n_image = 2 * model.tokens_per_image
    assert prefix["input_ids"].shape == (3, model.prompt_length)
    assert (prefix["input_ids"][:, :n_image] == model.hf_model.config.vlm_config.image_token_id).all()
    assert prefix["pixel_values"].shape == (3, 2, 3, model.image_size, model.image_size)
    assert prefix["state"].shape == (3, model.max_state_dim) and (prefix["state"][:, STATE_DIM:] == 0).all()
    # padded action dims are exact zeros in sampling: zero noise in, zero velocity out
    assert (model.hf_model.action_out_proj.weight[ACTION_DIM:] == 0).all()


def test_pi0_reads_only_its_state_inputs(tmp_path: Path) -> None:
    """model.state_inputs: the dims left out cannot change an action; the kept ones do; saved with it."""
    policy = build("pi0", state_inputs=["s7", "s10"]).eval()
    assert policy.spec.state_inputs == [7, 10]
    batch = make_batch(policy, size=2)
    noise = torch.randn(2, policy.chunk_size, ACTION_DIM, generator=torch.Generator().manual_seed(3))
    before = policy.predict_chunk(batch, noise=noise)
    hidden = copy.copy(batch)
    hidden.state = batch.state.clone()
    hidden.state[:, [0, 8, 9, 14]] += 5.0
    assert torch.equal(policy.predict_chunk(hidden, noise=noise), before)
    kept = copy.copy(batch)
    kept.state = batch.state.clone()
    kept.state[:, 7] += 5.0
    assert not torch.allclose(policy.predict_chunk(kept, noise=noise), before)
    policy.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    assert loaded.spec.state_inputs == [7, 10]
    assert torch.equal(loaded.predict_chunk(hidden, noise=noise), before)
    with pytest.raises(ConfigError, match="model.state_inputs"):
        build("pi0", state_inputs=["s7", "gripper"])
    # [] (the no-proprioception recipe): no state dim changes an action, and that is saved too
    blind = build("pi0", state_inputs=[]).eval()
    assert blind.spec.state_inputs == []
    everything = copy.copy(batch)
    everything.state = batch.state + 5.0
    reference = blind.predict_chunk(batch, noise=noise)
    assert torch.equal(blind.predict_chunk(everything, noise=noise), reference)
    blind.save_pretrained(tmp_path / "blind")
    assert load_policy(tmp_path / "blind").spec.state_inputs == []


def test_pi0_log_prob_is_the_negative_per_sample_flow_loss() -> None:
    """pi0's log_prob surrogate is minus each sample's flow-matching MSE (over its valid steps and the
    real action dims), and compute_loss is the same squared error averaged over every valid (step,
    dim) of the batch: both against the MSE computed here by hand from the model's velocity."""
    model = build("pi0")
    assert isinstance(model, PI0Policy)
    batch = make_batch(model)  # sample 1 is padded from mid-chunk: per-sample weights matter
    fixed = fixed_draws(model, 4)
    noise, time = fixed["noise"].double(), fixed["timestep"].double()[:, None, None]
    actions = hand_normalize(batch.actions)
    noisy = time * noise + (1 - time) * actions  # x_t: t = 1 is pure noise
    with torch.no_grad():
        log_prob = model.log_prob(batch, **fixed)
        loss = model.compute_loss(batch, **fixed)
        padded = torch.nn.functional.pad(noisy.float(), (0, model.max_action_dim - ACTION_DIM))
        velocity = model.hf_model(**model.prepare_prefix(batch), noise=padded, timestep=fixed["timestep"]).logits
    error = (velocity[..., :ACTION_DIM].double() - (noise - actions)) ** 2  # target velocity: noise - actions
    valid = batch.action_mask[:, :, None].expand_as(error)
    per_sample = (error * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2))
    torch.testing.assert_close(log_prob.double(), -per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), error[valid].mean(), rtol=1e-5, atol=1e-6)
    steps = batch.action_mask.sum(dim=1).double()  # = -log_prob weighted by valid steps
    torch.testing.assert_close(loss.double(), -(log_prob.double() * steps).sum() / steps.sum(), rtol=1e-5, atol=1e-6)
    assert steps.tolist() == [model.chunk_size, model.chunk_size // 2, model.chunk_size, model.chunk_size]
    assert not torch.allclose(loss.double(), -log_prob.double().mean())  # an unweighted mean would differ


# --- action tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("hf", [None, TINY_LLAVA_HF], ids=["paligemma", "llava"])
def test_token_decoding_matches_teacher_forcing(hf: dict[str, Any] | None) -> None:
    """Greedy KV-cache decoding picks, at each step, what the teacher-forced pass would: the
    prompt/cache/position handling is the same in both, and the action tokens are causal."""
    model = build("action_tokens", hf=hf)
    assert isinstance(model, ActionTokenPolicy)
    batch = make_batch(model, size=2)
    bins = model.predict_bins(batch)
    with torch.no_grad():
        logits = model.action_logits(batch, bins)
        assert torch.equal(logits.index_select(-1, model.action_token_ids).argmax(-1).reshape(bins.shape), bins)
        later = bins.clone()  # change the last action token: earlier logits must not move
        later[:, -1, -1] = (later[:, -1, -1] + 100) % 256
        assert torch.allclose(model.action_logits(batch, later)[:, :-1], logits[:, :-1], atol=1e-5)


def test_token_log_prob_and_loss_from_the_target_bins() -> None:
    """log_prob sums, over valid action tokens, the target bin's log-probability under a softmax over
    the 256 action tokens (what decoding picks from); compute_loss is the mean cross-entropy over the
    full vocabulary. So they are not each other's negative: per token, log_prob's term exceeds minus
    the cross-entropy by log(sum of all exp-logits / sum over action tokens) > 0. All from the
    teacher-forced logits of bins computed here by hand."""
    model = build("action_tokens")
    assert isinstance(model, ActionTokenPolicy)
    batch = make_batch(model)
    bins = ((hand_normalize(batch.actions) + 1) / 2 * 256).floor().long().clamp(0, 255)  # [B, chunk, A]
    assert torch.equal(model.actions_to_bins(batch.actions), bins)
    assert (bins[..., 5] == 128).all() and bins.min() == 0 and bins.max() == 255  # clipped beyond [q01, q99]
    with torch.no_grad():
        log_prob, loss = model.log_prob(batch), model.compute_loss(batch)
        logits = model.action_logits(batch, bins).double()  # [B, L, V]
    targets = bins.flatten(1)
    valid = batch.action_mask.repeat_interleave(ACTION_DIM, dim=1)  # step-major: A tokens per step
    token_ids = model.action_token_ids[0] + torch.arange(256)
    chosen = logits.gather(-1, (token_ids[0] + targets)[..., None])[..., 0]
    restricted = chosen - logits[..., token_ids].logsumexp(-1)
    full = chosen - logits.logsumexp(-1)
    torch.testing.assert_close(log_prob.double(), (restricted * valid).sum(dim=1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.double(), -full[valid].mean(), rtol=1e-5, atol=1e-5)
    gap = log_prob.double().sum() - (-loss.double() * valid.sum())
    torch.testing.assert_close(gap, ((restricted - full) * valid).sum(), rtol=1e-4, atol=1e-3)
    assert gap > 0


def test_action_bins() -> None:
    model = build("action_tokens")
    assert isinstance(model, ActionTokenPolicy)
    assert model.action_token_ids.shape == (256,) and model.bin_centers.shape == (256,)
    assert torch.equal(model.action_token_ids, model.action_token_ids[0] + torch.arange(256))
    bins = torch.randint(0, 256, (3, ACTION_DIM))
    bins[:, 5] = 128  # the constant dim maps to the centre
    assert torch.equal(model.actions_to_bins(model.bins_to_actions(bins)), bins)
    edges = model.actions_to_bins(torch.stack([model.action_low - 1, model.action_high + 1]))
    assert (edges[0, [0, 1, 2, 3, 4, 6]] == 0).all() and (edges[1, [0, 1, 2, 3, 4, 6]] == 255).all()


# --- processors ------------------------------------------------------------------------------


def test_tokenizer_is_local_and_deterministic() -> None:
    first, second = processing.build_tokenizer(action_tokens=True), processing.build_tokenizer(action_tokens=True)
    assert first.get_vocab() == second.get_vocab()
    assert [processing.token_id(first, t) for t in processing.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (first.pad_token_id, first.bos_token_id, first.eos_token_id) == (0, 1, 2)
    ids = processing.encode_instructions(first, ["pick up the red cube", "open the drawer Ü"], 24)
    assert all(0 < len(row) <= 24 for row in ids) and len(ids[0]) < 16  # trained merges: short prompts
    assert len(processing.build_tokenizer()) == len(first) - 256


def test_images_resized_and_scaled() -> None:
    images = torch.zeros(2, 2, 64, 64, 3, dtype=torch.uint8)
    images[:, 1] = 255
    pixels = processing.preprocess_images(images, 32)
    assert pixels.shape == (2, 2, 3, 32, 32)
    assert (pixels[:, 0] == -1).all() and (pixels[:, 1] == 1).all()
    with pytest.raises(ValueError, match="uint8"):
        processing.preprocess_images(images.float(), 32)


def test_normalization_round_trip() -> None:
    norm = processing.Normalization.from_manifest(synthetic_manifest())
    assert processing.Normalization.from_json(norm.to_json()) == norm
    t = norm.tensors()
    raw = t["action_low"] + (t["action_high"] - t["action_low"]) * torch.rand(5, ACTION_DIM)
    unit = processing.normalize_actions(raw, t["action_low"], t["action_scale"])
    assert unit.abs().max() <= 1 and (unit[:, 5] == 0).all()  # the constant dim maps to 0
    back = processing.unnormalize_actions(unit, t["action_low"], t["action_high"], t["action_scale"])
    assert torch.allclose(back, raw, atol=1e-5)
    # Known values: q01 -> -1, a quarter of the way -> -0.5, the middle -> 0, q99 -> 1, beyond -> clipped;
    # the constant dim 5 -> 0 whatever the value, and back to its one value.
    q01, q99 = (x.float() for x in manifest_action_range())
    points = torch.stack([q01 - 1, q01, q01 + (q99 - q01) / 4, (q01 + q99) / 2, q99, q99 + 1])
    want = torch.tensor([-1.0, -1.0, -0.5, 0.0, 1.0, 1.0])[:, None].repeat(1, ACTION_DIM)
    want[:, 5] = 0.0
    unit = processing.normalize_actions(points, t["action_low"], t["action_scale"])
    torch.testing.assert_close(unit, want, rtol=0, atol=1e-6)
    levels = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])[:, None].repeat(1, ACTION_DIM)
    raw = processing.unnormalize_actions(levels, t["action_low"], t["action_high"], t["action_scale"])
    torch.testing.assert_close(raw.double(), hand_unnormalize(levels), rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[4].double(), q01.double() + 0.75 * (q99 - q01).double(), rtol=0, atol=1e-6)
    assert (raw[:, 5] == q01[5]).all()
    with pytest.raises(ValueError, match="non-finite"):
        processing.Normalization([float("nan")], [1.0], [0.0], [1.0])


# --- full-size presets, on the meta device -------------------------------------------------------


def test_full_size_parameter_counts() -> None:
    # pi0: exactly transformers' PI0Config() defaults; used weights match the paper's 3.3B
    pi0 = model_cfg("pi0-3b")
    assert count_parameters(pi0) == 3_501_372_176
    assert count_parameters(pi0, exclude_unused=True) == pytest.approx(3.3e9, rel=0.03)
    # OpenVLA: 7.54B published with a fused DINOv2+SigLIP tower; LLaVA + SigLIP-so400m is 4.9% below
    openvla = model_cfg("openvla-7b")
    assert count_parameters(openvla) == pytest.approx(7.54e9, rel=0.05)
    normalization = processing.Normalization.from_manifest(synthetic_manifest())
    model = ActionTokenPolicy.build(openvla, _spec(openvla), normalization, meta=True)
    language = sum(p.numel() for p in model.hf_model.model.language_model.parameters())
    language += model.hf_model.lm_head.weight.numel()
    assert language == pytest.approx(6.74e9, rel=0.01)  # Llama-2-7B (+64 padded vocabulary rows)
    assert all(p.device.type == "meta" for p in model.hf_model.parameters())


def _spec(cfg: ModelSection) -> Any:
    from vla_dist.models.build import spec_from

    return spec_from(cfg, synthetic_manifest())


# --- model.pretrained ------------------------------------------------------------------------


def test_pretrained_in_config_takes_the_saved_architecture(tmp_path: Path) -> None:
    saved = build("action_tokens")
    saved.save_pretrained(tmp_path / "policy")
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'policy'}"])  # the default preset is tiny-pi0
    assert (cfg.model.family, cfg.model.chunk_size, cfg.model.hf) == ("action_tokens", saved.chunk_size, {})
    batch = make_batch(saved, size=2)
    assert torch.equal(build_policy(cfg.model, synthetic_manifest()).predict_chunk(batch), saved.predict_chunk(batch))
    with pytest.raises(ConfigError, match="model.chunk_size"):
        load_config(None, [f"model.pretrained={tmp_path / 'policy'}", "model.chunk_size=3"])
    other = synthetic_manifest() | {"cameras": ["front"]}
    with pytest.raises(ConfigError, match="model.pretrained.*cameras"):
        build_policy(cfg.model, other)


def test_pretrained_with_mismatched_weights_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    from vla_dist.cli import main

    build("pi0").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = "action_out_proj.bias"
    del weights[key]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert main(["config", f"model.pretrained={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and key in err and "model.safetensors" in err
