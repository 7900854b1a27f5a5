"""Post-training starts from what people have (issue 13, checkpoints in): a plain transformers PI0
checkpoint, written by transformers' own `PI0ForConditionalGeneration.save_pretrained` and the
tokenizer's own `save_pretrained` (never by vla-dist: no vla_dist.json, no normalization.json, its
own special-token ids), is `model.pretrained`. It loads with the dataset's statistics, dims and
cameras, LoRA-trains on 2 DeepSpeed ranks, exports, reloads and runs in the simulator; what cannot
be used fails at config time naming the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vla_dist.cli import main
from vla_dist.config.load import load_config
from vla_dist.config.validate import validate
from vla_dist.data.manifest import read_manifest
from vla_dist.errors import ConfigError
from vla_dist.models.build import build_policy, load_policy
from vla_dist.rl.loop import run_rl
from vla_dist.train.batches import EpisodeWindows
from vla_dist.train.sft import run_train

CORPUS = [
    "What action should the robot take to pick up the red cube?\n",
    "What action should the robot take to push the red cube to the green target?\n",
    "What action should the robot take to stack the red cube on the blue cube?\n",
    "pick place push stack lift grasp move the cube block target",
]


def plain_tokenizer():
    """A byte-level BPE wrapped as transformers' fast tokenizer, with PaliGemma's special tokens at
    ids of its own (<image> last, as in PaliGemma's vocabulary), not vla-dist's 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>", "<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def write_plain_pi0(out: Path, *, max_state_dim: int = 16, tokenizer: bool = True) -> Path:
    from transformers import PI0Config, PI0ForConditionalGeneration

    tok = plain_tokenizer()
    vocab = len(tok)
    config = PI0Config(
        vlm_config={
            "model_type": "paligemma", "projection_dim": 64, "hidden_size": 64, "vocab_size": vocab,
            "image_token_index": tok.convert_tokens_to_ids("<image>"),
            "text_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": vocab},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
                              "vision_use_head": False},
        },
        dit_config={"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
        chunk_size=4, max_action_dim=16, max_state_dim=max_state_dim,
    )
    torch.manual_seed(0)
    PI0ForConditionalGeneration(config).save_pretrained(out)
    if tokenizer:
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plain_pi0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plain_pi0(tmp_path_factory.mktemp("hub") / "pi0-plain")


def test_a_plain_pi0_checkpoint_loads_with_the_datasets_dims_and_statistics(plain_pi0, quickstart_run):
    from transformers import PI0ForConditionalGeneration

    _, data_dir, _ = quickstart_run
    assert not (plain_pi0 / "vla_dist.json").exists() and not (plain_pi0 / "normalization.json").exists()
    cfg = validate(load_config(None, [f"model.pretrained={plain_pi0}", f"data.dir={data_dir}"]))
    # the checkpoint's architecture, not the preset's (tiny-pi0: chunk 8)
    assert (cfg.model.family, cfg.model.chunk_size, cfg.model.image_size, cfg.model.hf) == ("pi0", 4, 32, {})
    manifest = read_manifest(data_dir)
    policy = build_policy(cfg.model, manifest).eval()
    assert (policy.action_dim, policy.state_dim, policy.cameras) == (
        manifest["action_space"]["dim"], manifest["state_space"]["dim"], list(manifest["cameras"]))
    assert policy.normalization.action_q01 == pytest.approx(manifest["action_stats"]["q01"])

    plain = PI0ForConditionalGeneration.from_pretrained(plain_pi0, local_files_only=True)
    theirs, ours = dict(plain.named_parameters()), dict(policy.hf_model.named_parameters())
    assert theirs.keys() == ours.keys()
    changed = [name for name in theirs if not torch.equal(theirs[name], ours[name])]
    assert "action_out_proj.weight" in changed and set(changed) <= {"action_out_proj.weight", "action_out_proj.bias"}, \
        changed  # only the padded action dims' output rows, zeroed
    dim = policy.action_dim
    assert torch.equal(ours["action_out_proj.weight"][:dim], theirs["action_out_proj.weight"][:dim])
    assert ours["action_out_proj.weight"][dim:].abs().sum() == 0 < theirs["action_out_proj.weight"][dim:].abs().sum()

    batch = EpisodeWindows(data_dir, policy.cameras, policy.chunk_size, 0, 1).batch(2, (1,))
    actions = policy.predict_chunk(batch, noise=torch.randn(2, policy.chunk_size, dim))
    assert actions.shape == (2, 4, dim) and torch.isfinite(actions).all()
    assert torch.isfinite(policy(batch))


@pytest.mark.heavy  # train, export, reload and evaluate in sim: ~70 s
def test_lora_post_training_from_a_plain_checkpoint_exports_reloads_and_evaluates(plain_pi0, quickstart_run, local_ray,
                                                                                   tmp_path):
    _, data_dir, _ = quickstart_run
    run_dir = tmp_path / "run"
    cfg = validate(load_config(None, [
        f"model.pretrained={plain_pi0}", f"data.dir={data_dir}", f"run.dir={run_dir}", "cluster.num_cpus=2",
        "train.world_size=2", "train.zero_stage=2", "train.lora.enabled=true", "train.lora.r=4", "train.steps=4",
        "train.save_every=4", "train.micro_batch_size=4", "train.lr=3e-3"]))
    report = run_train(cfg)
    assert report["trainable_parameters"] < report["parameters"] / 5  # LoRA, on the checkpoint's weights

    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out), "--merge-lora"]) == 0
    spec = json.loads((out / "vla_dist.json").read_text())
    assert (spec["chunk_size"], spec["image_size"], spec["action_dim"]) == (4, 32, 7)
    exported = load_policy(out).eval()
    base = build_policy(cfg.model, read_manifest(data_dir)).eval()  # the plain checkpoint as training started
    moved = [name for name, p in exported.hf_model.named_parameters()
             if not torch.equal(p, dict(base.hf_model.named_parameters())[name])]
    assert moved, "the LoRA update was merged into the exported weights"

    eval_dir = tmp_path / "eval"
    assert main(["eval", f"eval.checkpoint={out}", f"run.dir={eval_dir}", f"data.dir={data_dir}", "eval.episodes=1",
                 "task.name=pick_cube", "task.max_steps=4", "collect.num_actors=1", "collect.envs_per_actor=1",
                 "eval.num_videos=0"]) == 0
    assert json.loads((eval_dir / "report.json").read_text())["episodes"] == 1


def test_unusable_plain_checkpoints_fail_at_config_time_naming_the_file(quickstart_run, tmp_path):
    _, data_dir, _ = quickstart_run
    no_tokenizer = write_plain_pi0(tmp_path / "no-tokenizer", tokenizer=False)
    with pytest.raises(ConfigError, match="tokenizer.json is missing") as error:
        load_config(None, [f"model.pretrained={no_tokenizer}"])
    assert error.value.key == "model.pretrained"

    narrow = write_plain_pi0(tmp_path / "narrow", max_state_dim=8)  # the dataset's state has 15 dims
    cfg = validate(load_config(None, [f"model.pretrained={narrow}", f"data.dir={data_dir}"]))
    with pytest.raises(ConfigError, match="exceed the checkpoint's max_action_dim/max_state_dim 16/8"):
        build_policy(cfg.model, read_manifest(data_dir))

    qwen = tmp_path / "qwen2_vl"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ConfigError, match="'qwen2_vl' cannot start post-training; plain checkpoints of model_type "
                                          "pi0, paligemma, llava can"):
        load_config(None, [f"model.pretrained={qwen}"])
    with pytest.raises(ConfigError, match="plain transformers checkpoint: RL needs a policy"):  # before Ray
        run_rl(validate(load_config(None, [f"model.pretrained={narrow}", f"data.dir={data_dir}",
                                           f"run.dir={tmp_path / 'rl'}"])))


def test_zero3_loads_a_plain_checkpoint_partitioned(plain_pi0, quickstart_run, local_ray, tmp_path):
    """Under ZeRO-3 each rank holds only its partition of the checkpoint from the moment it is built
    (transformers' from_pretrained under deepspeed.zero.Init), and what it holds is the checkpoint:
    the first loss on the same fixed batch equals a ZeRO-2 run's, which loads it whole."""
    _, data_dir, _ = quickstart_run
    reports = {}
    for stage in (2, 3):
        reports[stage] = run_train(validate(load_config(None, [
            f"model.pretrained={plain_pi0}", f"data.dir={data_dir}", f"run.dir={tmp_path / f'zero{stage}'}",
            "cluster.num_cpus=2", "train.world_size=2", f"train.zero_stage={stage}", "train.steps=1",
            "train.save_every=0", "train.micro_batch_size=2", "train.fixed_batches=true"])))
    total = reports[2]["parameters"]
    assert reports[3]["parameters"] == total
    assert reports[2]["model_load"]["held_elements"] == [total, total]
    held = reports[3]["model_load"]["held_elements"]
    assert sum(held) >= total and max(held) < 0.55 * total, (held, total)  # a half each (+ padding)
    assert reports[3]["first_loss"] == pytest.approx(reports[2]["first_loss"], rel=1e-5)
    assert all(mb and mb > 0 for mb in reports[3]["model_load"]["peak_rss_mb"])


def test_bench_load_reports_memory_per_rank_partitioned_and_whole(plain_pi0, quickstart_run, local_ray, tmp_path,
                                                                  capsys):
    _, data_dir, _ = quickstart_run
    assert main(["bench", "load", f"model.pretrained={plain_pi0}", f"data.dir={data_dir}", f"run.dir={tmp_path}",
                 "train.world_size=2", "cluster.num_cpus=2", "model.dtype=bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["name"] == "load" and report["unit"] == "MiB" and report["world_size"] == 2
    assert report["ratio"] == pytest.approx(report["baseline"] / report["value"], rel=1e-2)
    whole, parts = report["zero2"]["held_elements_per_rank"], report["zero3"]["held_elements_per_rank"]
    assert whole[0] == whole[1] and sum(parts) >= whole[0] and max(parts) < 0.55 * whole[0]
    assert len(report["zero3"]["peak_mb_per_rank"]) == 2 and report["checkpoint_bytes"] > 0
    # bf16 partitions (zero.Init would follow the CPU training config's fp32 and double them)
    assert report["zero3"]["held_bytes_per_rank"] == [2 * n for n in parts]


def write_plain_paligemma(out: Path) -> Path:
    """A tiny PaliGemma VLM as its own save_pretrained writes it: no action tokens in its vocabulary."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    tok = plain_tokenizer()
    vocab = len(tok)
    config = PaliGemmaConfig(
        projection_dim=64, hidden_size=64, vocab_size=vocab, image_token_index=tok.convert_tokens_to_ids("<image>"),
        text_config={"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": vocab},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
                       "vision_use_head": False})
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.heavy  # a LoRA run on a plain PaliGemma: ~75 s; the plain Llava test keeps conversion in the main suite
def test_a_plain_paligemma_becomes_the_action_token_backbone_and_lora_trains(quickstart_run, local_ray, tmp_path):
    """The VLM keeps every weight and token it had; 256 action tokens are added with distinct
    embedding rows; LoRA trains on 2 ranks, the merged export reloads and runs in the simulator."""
    from transformers import PaliGemmaForConditionalGeneration

    _, data_dir, _ = quickstart_run
    plain = write_plain_paligemma(tmp_path / "paligemma-plain")
    cfg = validate(load_config(None, [
        f"model.pretrained={plain}", f"data.dir={data_dir}", f"run.dir={tmp_path / 'run'}", "cluster.num_cpus=2",
        "train.world_size=2", "train.zero_stage=2", "train.lora.enabled=true", "train.lora.r=4", "train.steps=4",
        "train.save_every=4", "train.micro_batch_size=2", "train.lr=3e-3"]))
    assert (cfg.model.family, cfg.model.image_size, cfg.model.chunk_size) == ("action_tokens", 32, 8)
    policy = build_policy(cfg.model, read_manifest(data_dir))
    theirs = PaliGemmaForConditionalGeneration.from_pretrained(plain, local_files_only=True)
    old_rows = theirs.get_input_embeddings().weight
    rows = policy.hf_model.get_input_embeddings().weight
    assert rows.shape[0] == old_rows.shape[0] + 256 == len(policy.tokenizer)
    assert torch.equal(rows[: old_rows.shape[0]], old_rows)  # every token it knew, unchanged
    new_rows = rows[policy.action_token_ids]
    assert torch.cdist(new_rows, new_rows).add(torch.eye(256) * 1e9).min() > 1e-3  # 256 tokens told apart
    assert policy.tokenizer.convert_ids_to_tokens(int(policy.action_token_ids[0])) == "<act_000>"

    report = run_train(cfg)
    assert report["trainable_parameters"] < report["parameters"] / 3 and math.isfinite(report["final_loss"])
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--merge-lora"]) == 0
    exported = load_policy(out).eval()
    assert exported.family == "action_tokens" and len(exported.tokenizer) == len(policy.tokenizer)
    assert main(["eval", f"eval.checkpoint={out}", f"run.dir={tmp_path / 'eval'}", f"data.dir={data_dir}",
                 "eval.episodes=1", "task.name=pick_cube", "task.max_steps=4", "collect.num_actors=1",
                 "collect.envs_per_actor=1", "eval.num_videos=0"]) == 0


def test_a_plain_llava_becomes_the_action_token_backbone(quickstart_run, tmp_path):
    """LLaVA (a Llama text model, SigLIP vision with every patch kept) as saved by transformers itself:
    action tokens added, the prompt's image tokens match its features, a loss and a chunk come out."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _, data_dir, _ = quickstart_run
    tok = plain_tokenizer()
    config = LlavaConfig(
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, projector_hidden_act="gelu",
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok),
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 8, "image_size": 32})
    torch.manual_seed(0)
    plain = tmp_path / "llava-plain"
    LlavaForConditionalGeneration(config).save_pretrained(plain)
    tok.save_pretrained(plain)

    cfg = validate(load_config(None, [f"model.pretrained={plain}", f"data.dir={data_dir}", "model.chunk_size=2"]))
    assert (cfg.model.family, cfg.model.image_size, cfg.model.chunk_size) == ("action_tokens", 32, 2)
    policy = build_policy(cfg.model, read_manifest(data_dir)).eval()
    assert policy.hf_model.get_input_embeddings().weight.shape[0] == len(tok) + 256 == len(policy.tokenizer)
    batch = EpisodeWindows(data_dir, policy.cameras, policy.chunk_size, 0, 1).batch(2, (1,))
    assert torch.isfinite(policy(batch))
    actions = policy.predict_chunk(batch)
    assert actions.shape == (2, 2, policy.action_dim) and torch.isfinite(actions).all()
