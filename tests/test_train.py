"""`vla-dist train` end to end: real DeepSpeed ZeRO on 2 gloo ranks in real Ray actors (the session's
in-process Ray), tiny-pi0 on the quickstart dataset. No mocks.

The first DeepSpeed init on a machine compiles its shared-memory comm op (~1 min, cached under
TORCH_EXTENSIONS_DIR); after that each run here costs ~10-20 s (actor start + engine init)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_dist.checkpoint import manager as ckpt
from vla_dist.checkpoint.export import export_checkpoint, rebuild_policy
from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.schema import ModelSection
from vla_dist.config.validate import validate
from vla_dist.errors import ConfigError, VlaDistError
from vla_dist.models.build import build_policy, load_policy
from vla_dist.models.files import PretrainedError
from vla_dist.models.policy import PolicyBatch, VLAPolicy
from vla_dist.train import run_train
from vla_dist.train.batches import EpisodeWindows
from vla_dist.train.metrics import read_metrics

from .faults import nan_worker

STEPS = 16


def train_cfg(run_dir: Path, data_dir: Path, *overrides: str):
    return validate(load_config(None, [f"run.dir={run_dir}", f"data.dir={data_dir}", "cluster.num_cpus=2",
                                       "train.world_size=2", "train.micro_batch_size=4", "train.lr=3e-3",
                                       "train.fixed_batches=true",
                                       *overrides]))


def fixed_inputs(policy, data_dir: Path):
    windows = EpisodeWindows(data_dir, policy.cameras, policy.chunk_size, rank=0, world_size=1)
    batch = windows.batch(3, (123,))
    noise = torch.randn(3, policy.chunk_size, policy.action_dim, generator=torch.Generator().manual_seed(7))
    return batch, noise


@pytest.fixture(scope="module")
def zero2_run(quickstart_run, local_ray, tmp_path_factory):
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path_factory.mktemp("train") / "zero2"
    cfg = train_cfg(run_dir, data_dir, f"train.steps={STEPS}", "train.save_every=8", "train.zero_stage=2",
                    "train.breakdown=true")
    report = run_train(cfg)
    return cfg, report, read_metrics(run_dir / "metrics.jsonl")


def test_zero2_loss_falls_with_metrics_and_checkpoints(zero2_run):
    cfg, report, rows = zero2_run
    run_dir = Path(cfg.run.dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s"} <= row.keys()
        assert torch.isfinite(torch.tensor(row["loss"]))
    losses = [row["loss"] for row in rows]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses
    assert (run_dir / "loss.png").stat().st_size > 0
    for row in rows:  # train.breakdown: every phase of every step, DeepSpeed's split of backward inside it
        phases = row["breakdown_ms"]
        assert {"data", "forward", "nan_check", "backward", "step", "other"} <= phases.keys(), phases
        assert min(phases.values()) >= 0, phases
        assert phases["backward_compute"] + phases["gradient_reduction"] <= phases["backward"] * 1.05 + 0.5, phases
        own = sum(phases[key] for key in ("data", "forward", "nan_check", "backward", "step", "other"))
        assert own == pytest.approx(row["step_time_s"] * 1e3, rel=1e-3, abs=0.01), (own, row)
    assert report["final_loss"] == json.loads((run_dir / "report.json").read_text())["final_loss"] == losses[-1]
    assert rows[0]["lr"] == pytest.approx(1.5e-3) and rows[1]["lr"] == pytest.approx(3e-3)  # warm-up (2 steps)
    assert rows[-1]["lr"] < 1e-4  # cosine decay
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, STEPS)
    assert (ckpt.checkpoints_dir(run_dir) / "latest").read_text().strip() == f"step_{STEPS}"
    for step in (8, STEPS):
        assert ckpt.is_complete(ckpt.step_dir(run_dir, step))


def test_resume_auto_continues_the_loss(zero2_run, tmp_path):
    cfg, _, rows = zero2_run
    # a copy of the run as if it had died after step 8's checkpoint (step 16's never completed)
    run_dir = tmp_path / "crashed"
    shutil.copytree(cfg.run.dir, run_dir)
    (ckpt.step_dir(run_dir, STEPS) / ckpt.COMPLETE).unlink()
    resumed_cfg = train_cfg(run_dir, Path(cfg.data.dir), f"train.steps={STEPS}", "train.save_every=8")
    report = run_train(resumed_cfg)
    assert report["first_step"] == 8 and report["resumed_from"].endswith("step_8")
    again = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in again] == list(range(1, STEPS + 1))  # steps 9.. written once
    for before, after in zip(rows[8:], again[8:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-6), (before, after)
    assert ckpt.is_complete(ckpt.step_dir(run_dir, STEPS))


def test_export_round_trip_predicts_the_trained_actions(zero2_run, tmp_path):
    cfg, _, _ = zero2_run
    step_dir = ckpt.step_dir(cfg.run.dir, 8)
    check_export_against_saved_module(step_dir, tmp_path / "export", Path(cfg.data.dir), tol=1e-5)


def check_export_against_saved_module(step_dir: Path, out: Path, data_dir: Path,
                                      tol: float) -> tuple[PolicyBatch, torch.Tensor, torch.Tensor]:
    """`export_checkpoint` of a full fine-tune predicts what the module DeepSpeed itself saved predicts
    (its pickle, read by this test only, never by vla-dist; whole at ZeRO 0-2) in a policy rebuilt
    independently, and not what the untrained init predicts. Returns (batch, noise, exported actions)."""
    result = export_checkpoint(step_dir, out)
    assert result["kind"] == "full" and result["step"] == 8
    exported = load_policy(out).eval()
    meta = json.loads((step_dir / ckpt.META).read_text())
    reference, untrained = rebuild_policy(meta).eval(), rebuild_policy(meta).eval()
    states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    reference.load_state_dict(states, strict=False)
    batch, noise = fixed_inputs(exported, data_dir)
    actions = exported.predict_chunk(batch, noise=noise)
    torch.testing.assert_close(actions, reference.predict_chunk(batch, noise=noise), rtol=tol, atol=tol)
    assert not torch.allclose(actions, untrained.predict_chunk(batch, noise=noise), atol=1e-4)
    return batch, noise, actions


def live_weights_worker() -> type:
    """An SFTWorker whose ranks, at each save, also gather every parameter they hold in memory (ZeRO-3
    partitions them) and rank 0 writes them to run.dir/live_step_N.pt: the weights training produced,
    taken from the live engine, independently of the checkpoint's files and of export. Made inside a
    function so Ray ships the class to the actors by value (as tests/faults.py's)."""
    from vla_dist.train.worker import SFTWorker

    class SFTWorkerKeepingLiveWeights(SFTWorker):
        def _save_engine(self, path: Path) -> None:
            super()._save_engine(path)
            import deepspeed

            module = self.engine.module
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    live = {name: param.detach().clone() for name, param in module.named_parameters()}
                    torch.save(live, path.parent.parent / f"live_{path.name}.pt")

    return SFTWorkerKeepingLiveWeights


@pytest.fixture(scope="module")
def zero3_run(quickstart_run, local_ray, tmp_path_factory):
    """A full fine-tune under ZeRO-3 (every parameter partitioned over the 2 ranks), 4 steps, one
    checkpoint at step 4, with the live weights at that save beside it (live_weights_worker)."""
    _, data_dir, _ = quickstart_run
    cfg = train_cfg(tmp_path_factory.mktemp("train") / "zero3", data_dir, "train.steps=4", "train.save_every=4",
                    "train.zero_stage=3")
    return cfg, run_train(cfg, worker_cls=live_weights_worker())


def plain_hf_model(policy_dir: Path) -> torch.nn.Module:
    """The model of a policy directory as plain transformers loads it, nothing of vla-dist involved:
    the class its config.json declares, from_pretrained."""
    import transformers

    (architecture,) = json.loads((policy_dir / "config.json").read_text())["architectures"]
    return getattr(transformers, architecture).from_pretrained(str(policy_dir), local_files_only=True).eval()


def plain_and_ours(model: torch.nn.Module, policy, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(`model.sample_actions` on the policy's own prefix and noise, un-normalized as the policy does;
    the policy's predict_chunk) on the same fixed windows."""
    batch, noise = fixed_inputs(policy, data_dir)
    with torch.no_grad():
        norm = model.sample_actions(**policy.prepare_prefix(batch), noise=policy.full_noise(noise, 3),
                                    num_steps=policy.spec.num_inference_steps)
    return policy.unnormalize_actions(norm), policy.predict_chunk(batch, noise=noise)


def test_cli_export_of_a_zero3_run_is_the_trained_weights_in_plain_transformers(zero3_run, tmp_path, capsys):
    """`vla-dist export` of a ZeRO-3 full fine-tune (shards consolidated by zero_to_fp32), loaded by
    plain transformers: exactly the weights the ranks held when they saved; vla-dist's loader gives
    the same weights and the same actions."""
    cfg, report = zero3_run
    assert (report["zero_stage"], report["lora"], report["last_step"]) == (3, False, 4)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", cfg.run.dir, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "export done: " in printed and "step=4" in printed and "kind=full" in printed, printed
    live = torch.load(Path(cfg.run.dir) / "live_step_4.pt", map_location="cpu", weights_only=True)
    trained = {name.removeprefix("hf_model."): tensor for name, tensor in live.items()}
    assert len(trained) == len(live) > 0  # all of them the transformers model's

    plain = plain_hf_model(out)
    assert type(plain).__name__ == "PI0ForConditionalGeneration"
    params = dict(plain.named_parameters())
    assert params.keys() == trained.keys()
    differ = [name for name, tensor in trained.items() if not torch.equal(params[name], tensor)]
    assert not differ, differ[:5]
    # ... and those are trained weights, not the init the export rebuilds its policy from
    untrained = rebuild_policy(json.loads((ckpt.step_dir(cfg.run.dir, 4) / ckpt.META).read_text())).hf_model
    moved = [name for name, param in untrained.named_parameters()
             if param.requires_grad and not torch.equal(param, trained[name])]
    assert len(moved) > 0.5 * sum(param.requires_grad for param in untrained.parameters()), len(moved)

    ours = load_policy(out).eval()
    assert all(torch.equal(param, params[name]) for name, param in ours.hf_model.named_parameters())
    theirs, predicted = plain_and_ours(plain, ours, Path(cfg.data.dir))
    torch.testing.assert_close(theirs, predicted, rtol=0, atol=0)


def test_object_target_trains_under_zero3_resumes_and_exports_without_its_head(quickstart_run, local_ray, tmp_path):
    """train.object_target under ZeRO-3 (the head partitioned with the policy), on loader batches of
    the quickstart dataset's recorded cube positions: every step reports the head's error, a resumed
    run continues, and the export is the policy alone (no head weights, loadable). A dataset without
    recorded positions is refused by key before any rank starts."""
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "object"
    common = ("train.save_every=4", "train.zero_stage=3", "train.fixed_batches=false", "train.object_target=1.0")
    run_train(train_cfg(run_dir, data_dir, "train.steps=4", *common))
    run_train(train_cfg(run_dir, data_dir, "train.steps=6", *common))  # resumes from step 4 (train.resume=auto)
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 < row["object_error_cm"] < 100 for row in rows), rows
    out = tmp_path / "export"
    assert export_checkpoint(run_dir, out)["kind"] == "full"
    exported = load_policy(out)
    assert "object_head" not in exported._modules
    assert not any("object_head" in name for name in exported.state_dict())

    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(data_dir, unrecorded)
    manifest = json.loads((unrecorded / "manifest.json").read_text())
    assert manifest["extra"].pop("object_pos")  # what collection now records
    (unrecorded / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="records no object positions") as error:
        run_train(train_cfg(tmp_path / "refused", unrecorded, "train.steps=2", *common))
    assert error.value.key == "train.object_target" and not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def lora_run(quickstart_run, local_ray, tmp_path_factory):
    """LoRA under ZeRO-3, 4 steps, one injected non-finite loss (skipped, training goes on)."""
    _, data_dir, _ = quickstart_run
    cfg = train_cfg(tmp_path_factory.mktemp("train") / "lora", data_dir, "train.steps=4", "train.save_every=4",
                    "train.zero_stage=3", "train.lora.enabled=true", "train.lora.r=4")
    return cfg, run_train(cfg, worker_cls=nan_worker("2"))


def test_lora_zero3_saves_a_whole_adapter(lora_run):
    cfg, report = lora_run
    assert report["nan_skipped"] == 1 and report["trainable_parameters"] < report["parameters"] / 5
    from safetensors.torch import load_file

    adapter = load_file(ckpt.step_dir(cfg.run.dir, 4) / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(("lora_B" in k) and t.abs().sum() > 0 for k, t in adapter.items())  # trained, not the zero init


def test_unmerged_lora_export_loads_with_its_adapter(lora_run, tmp_path):
    """An export without --merge-lora (base weights + adapter/) is the adapted policy wherever it is
    loaded: load_policy and model.pretrained both merge the adapter; the base alone (what was once
    loaded, silently) predicts otherwise."""
    cfg, _ = lora_run
    data_dir = Path(cfg.data.dir)
    assert export_checkpoint(cfg.run.dir, tmp_path / "adapter_export")["kind"] == "adapter"
    assert export_checkpoint(cfg.run.dir, tmp_path / "merged", merge_lora=True)["kind"] == "merged"
    merged, unmerged = load_policy(tmp_path / "merged").eval(), load_policy(tmp_path / "adapter_export").eval()
    base_only = VLAPolicy.from_pretrained(tmp_path / "adapter_export").eval()  # the weights beside adapter/
    batch, noise = fixed_inputs(merged, data_dir)
    actions = unmerged.predict_chunk(batch, noise=noise)
    torch.testing.assert_close(actions, merged.predict_chunk(batch, noise=noise), rtol=1e-6, atol=1e-6)
    assert (actions - base_only.predict_chunk(batch, noise=noise)).abs().max() > 1e-4
    assert type(unmerged.hf_model) is type(base_only.hf_model)  # merged in: a plain model, no peft wrapper
    # training (or a new LoRA) from an unmerged export starts at the adapted weights
    meta = json.loads((ckpt.latest_checkpoint(cfg.run.dir) / ckpt.META).read_text())
    model_cfg = ModelSection(**{**meta["model"], "pretrained": str(tmp_path / "adapter_export")})
    from_pretrained = build_policy(model_cfg, meta["manifest"]).eval()
    torch.testing.assert_close(from_pretrained.predict_chunk(batch, noise=noise), actions, rtol=1e-6, atol=1e-6)
    # a half-copied adapter is refused by name, not silently skipped
    (tmp_path / "adapter_export" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="adapter_model.safetensors is missing"):
        load_policy(tmp_path / "adapter_export")
    with pytest.raises(ConfigError, match="adapter_model.safetensors is missing") as error:  # before any actor starts
        validate(load_config(None, [f"eval.checkpoint={tmp_path / 'adapter_export'}"]))
    assert error.value.key == "eval.checkpoint"


def test_cli_unmerged_lora_export_loads_in_plain_transformers_and_peft(lora_run, tmp_path, capsys):
    """`vla-dist export` of the LoRA ZeRO-3 run without --merge-lora: the base by plain transformers,
    the adapter by plain peft (`PeftModel.from_pretrained(base, OUT/adapter)`, as export.py documents)
    hold the trained adapter and act as vla-dist's loader (which merges it) does; with the adapter
    disabled they act otherwise. The --merge-lora export, loaded by plain transformers, is peft's merge."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, _ = lora_run
    data_dir = Path(cfg.data.dir)
    out, merged_out = tmp_path / "export", tmp_path / "merged"
    assert main(["export", "--checkpoint", cfg.run.dir, "--out", str(out)]) == 0
    assert "kind=adapter" in capsys.readouterr().out
    assert main(["export", "--checkpoint", cfg.run.dir, "--out", str(merged_out), "--merge-lora"]) == 0
    assert "kind=merged" in capsys.readouterr().out

    peft_model = PeftModel.from_pretrained(plain_hf_model(out), str(out / "adapter")).eval()
    saved = load_file(ckpt.latest_checkpoint(cfg.run.dir) / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[key], saved[key]) for key in saved)

    ours = load_policy(out).eval()
    theirs, predicted = plain_and_ours(peft_model, ours, data_dir)  # unmerged LoRA vs merged: float rounding
    torch.testing.assert_close(theirs, predicted, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter():
        base_only, _ = plain_and_ours(peft_model, ours, data_dir)
    assert (base_only - predicted).abs().max() > 1e-4

    merged = plain_hf_model(merged_out)
    peft_merged = dict(peft_model.merge_and_unload().named_parameters())
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, peft_merged[name], rtol=0, atol=0, msg=name)
    for name, param in ours.hf_model.named_parameters():
        torch.testing.assert_close(param, peft_merged[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.heavy  # ~85 s of sim actors; the fast test above checks the same loading in-process
def test_eval_actors_run_an_unmerged_export_with_its_adapter(lora_run, tmp_path):
    """The chain `vla-dist eval eval.checkpoint=DIR` runs (resolve_policy -> PolicySource -> a real
    Genesis SimActor's ModelPolicy): the unmerged export drives the same closed-loop episode as the
    merged one, and another than its base weights alone."""
    import ray

    from vla_dist.rollout.actor import SimActor
    from vla_dist.rollout.evaluate import resolve_policy
    from vla_dist.rollout.runner import EpisodeRequest

    cfg, _ = lora_run
    export_checkpoint(cfg.run.dir, tmp_path / "adapter_export")
    export_checkpoint(cfg.run.dir, tmp_path / "merged", merge_lora=True)
    shutil.copytree(tmp_path / "adapter_export", tmp_path / "base_only", ignore=shutil.ignore_patterns("adapter"))
    actions = {}
    for name in ("adapter_export", "merged", "base_only"):
        eval_cfg = validate(load_config(None, [f"eval.checkpoint={tmp_path / name}", f"run.dir={tmp_path / 'eval'}",
                                               f"data.dir={cfg.data.dir}", "task.max_steps=10"]))
        source = resolve_policy(eval_cfg)
        assert source.kind == "model" and source.path == str(tmp_path / name)
        actor = ray.remote(SimActor).options(num_cpus=1).remote(eval_cfg.task, eval_cfg.sim, 1, "npz", source)
        try:
            result = ray.get(actor.run_chunk.remote([EpisodeRequest(0, "pick_cube", 4321)]), timeout=900)
        finally:
            ray.kill(actor)
        actions[name] = result.outcomes[0].actions
    np.testing.assert_allclose(actions["adapter_export"], actions["merged"], atol=1e-5)
    assert np.abs(actions["adapter_export"] - actions["base_only"]).max() > 1e-4


@pytest.fixture(scope="module")
def zero0_run(quickstart_run, local_ray, tmp_path_factory):
    """train.zero_stage=0 (plain data parallel: no ZeRO partitions), 2 ranks, checkpoints at 4 and 8."""
    _, data_dir, _ = quickstart_run
    cfg = train_cfg(tmp_path_factory.mktemp("train") / "zero0", data_dir, "train.steps=8", "train.save_every=4",
                    "train.zero_stage=0")
    return cfg, run_train(cfg), read_metrics(Path(cfg.run.dir) / "metrics.jsonl")


@pytest.mark.heavy  # an eval in sim actors: ~65 s
def test_zero0_checkpoint_exports_and_evaluates(zero0_run, tmp_path):
    """A stage-0 checkpoint (DeepSpeed's zero_to_fp32 fails on it: no partitions) exports through our
    safetensors copy to the weights DeepSpeed saved, and `vla-dist eval` takes the run directory."""
    from vla_dist.checkpoint.stage0 import MODEL_FILE, OPTIM_FILE

    cfg, report, rows = zero0_run
    assert report["zero_stage"] == 0 and [row["step"] for row in rows] == list(range(1, 9))
    step_dir = ckpt.step_dir(cfg.run.dir, 8)
    assert (step_dir / MODEL_FILE).is_file() and (step_dir / OPTIM_FILE).is_file()
    batch, noise, actions = check_export_against_saved_module(step_dir, tmp_path / "export", Path(cfg.data.dir),
                                                              tol=1e-6)

    eval_dir = tmp_path / "eval"
    assert main(["eval", f"eval.checkpoint={cfg.run.dir}", f"run.dir={eval_dir}", f"data.dir={cfg.data.dir}",
                 "eval.episodes=1", "task.name=pick_cube", "task.max_steps=5", "collect.num_actors=1",
                 "collect.envs_per_actor=1", "eval.num_videos=0"]) == 0
    evaluated = json.loads((eval_dir / "report.json").read_text())
    assert evaluated["policy"] == "model" and evaluated["episodes"] == 1
    assert evaluated["checkpoint"] == str(eval_dir / "policy")
    torch.testing.assert_close(load_policy(eval_dir / "policy").predict_chunk(batch, noise=noise), actions)


def test_zero0_resume_auto_continues_the_loss(zero0_run, tmp_path):
    """Same world size and stage: DeepSpeed's own loader on the stage-0 checkpoint."""
    cfg, _, rows = zero0_run
    run_dir = tmp_path / "crashed"
    shutil.copytree(cfg.run.dir, run_dir)
    (ckpt.step_dir(run_dir, 8) / ckpt.COMPLETE).unlink()
    report = run_train(train_cfg(run_dir, Path(cfg.data.dir), "train.steps=8", "train.save_every=4",
                                 "train.zero_stage=0"))
    assert report["first_step"] == 4 and report["resumed_from"].endswith("step_4")
    again = read_metrics(run_dir / "metrics.jsonl")
    for before, after in zip(rows[4:], again[4:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-6), (before, after)


def test_repeated_nan_losses_stop_with_the_last_checkpoint_kept(quickstart_run, local_ray, tmp_path):
    _, data_dir, _ = quickstart_run
    cfg = train_cfg(tmp_path / "nan", data_dir, "train.steps=6", "train.save_every=2", "train.max_nan_steps=2")
    with pytest.raises(VlaDistError, match="non-finite.*step_2"):
        run_train(cfg, worker_cls=nan_worker("3+"))
    assert ckpt.latest_checkpoint(cfg.run.dir) == ckpt.step_dir(cfg.run.dir, 2)


def test_batch_and_world_size_mismatches_are_config_errors(quickstart_run, local_ray, tmp_path):
    _, data_dir, _ = quickstart_run
    with pytest.raises(ConfigError) as error:
        train_cfg(tmp_path, data_dir, "train.global_batch_size=6")  # 4 * 1 * 2 = 8
    assert error.value.key == "train.global_batch_size"
    with pytest.raises(ConfigError) as error:  # more ranks than episodes: checked before any actor starts
        run_train(train_cfg(tmp_path, data_dir, "train.world_size=9", "train.micro_batch_size=1"))
    assert error.value.key == "train.world_size"
    with pytest.raises(ConfigError) as error:  # 3 ranks x 1 CPU on the 2-CPU local Ray: refused, not waited on
        run_train(train_cfg(tmp_path, data_dir, "train.world_size=3"))
    assert error.value.key == "train.world_size"
    with pytest.raises(ConfigError) as error:
        train_cfg(tmp_path, data_dir, "train.offload_params=true", "train.zero_stage=2")
    assert error.value.key == "train.offload_params"


def test_checkpoint_pointer_and_pruning(tmp_path):
    for step in range(1, 6):
        ckpt.step_dir(tmp_path, step).mkdir(parents=True)
    for step in range(1, 5):
        ckpt.mark_complete(ckpt.step_dir(tmp_path, step), step, {})
    (ckpt.checkpoints_dir(tmp_path) / "step_2" / ckpt.COMPLETE).unlink()  # as if a rank never finished step 2
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 4)  # step_5: no marker, never resumed
    ckpt.prune(tmp_path, keep_last=2)
    left = sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).glob("step_*"))
    assert left == ["step_3", "step_4", "step_5"]  # step_5 may still be being written: kept
    assert ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.resolve_resume(str(ckpt.step_dir(tmp_path, 3)), tmp_path) == ckpt.step_dir(tmp_path, 3)
    with pytest.raises(ConfigError):
        ckpt.resolve_resume(str(ckpt.step_dir(tmp_path, 5)), tmp_path)
