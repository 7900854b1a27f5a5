"""Config loading, composition, validation, and the CLI's config/usage contract (exit codes, messages)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_dist.cli import main
from vla_dist.config import ConfigError, RunConfig, load_config, save_resolved, validate
from vla_dist.config.rules import value_at

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("ray", "genesis", "torch", "deepspeed")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _subprocess_env() -> dict[str, str]:
    # Works before `pip install -e .` too: the checkout goes first on the path.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def _config_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, assert it exits 2 for a bad config, return its stderr."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


# --- loading and composition -------------------------------------------------------------------


def test_quickstart_loads_and_validates() -> None:
    cfg = validate(load_config(None, []))
    assert isinstance(cfg, RunConfig)
    assert cfg.task.name == "all"  # from task/all.yaml via defaults
    assert (cfg.task.image_size, cfg.collect.episodes) == (64, 12)
    assert (cfg.collect.num_actors, cfg.collect.envs_per_actor) == (2, 2)
    assert (cfg.run.dir, cfg.data.dir, cfg.cluster.address) == ("runs/quickstart", "data/quickstart", None)


def test_default_config_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, []).collect.episodes == 12


def test_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(None, ["collect.episodes=4", "task.cameras=[front]", "cluster.address=auto", "sim.dt=5e-3"])
    assert cfg.collect.episodes == 4
    assert cfg.task.cameras == ["front"]
    assert cfg.cluster.address == "auto"
    assert cfg.sim.dt == pytest.approx(0.005)


def test_composition_order_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    _write(configs / "task" / "base.yaml", "task: {name: push_cube, image_size: 32}\ncollect: {episodes: 5}\n")
    _write(configs / "task" / "mine.yaml", "defaults: [task/base.yaml]\ncollect: {episodes: 6, num_actors: 3}\n")
    top = _write(configs / "run.yaml", "defaults: [task/mine.yaml]\ncollect: {episodes: 7}\n")
    cfg = load_config(top, [])
    assert cfg.task.name == "push_cube" and cfg.task.image_size == 32  # nested defaults only
    assert cfg.collect.num_actors == 3  # the nearer default wins over the farther one
    assert cfg.collect.episodes == 7  # the file wins over its defaults
    assert load_config(top, ["collect.episodes=9"]).collect.episodes == 9  # overrides win over all


def test_user_file_composes_shipped_task_files(tmp_path: Path) -> None:
    mine = _write(tmp_path / "mine.yaml", "defaults: [task/stack_cube.yaml]\n")
    assert load_config(mine, []).task.name == "stack_cube"


def test_defaults_cycle_and_missing_default(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    _write(configs / "a.yaml", "defaults: [b.yaml]\n")
    _write(configs / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle.*a.yaml"):
        load_config(configs / "a.yaml", [])
    _write(configs / "c.yaml", "defaults: [task/nope.yaml]\n")
    with pytest.raises(ConfigError, match="task/nope.yaml"):
        load_config(configs / "c.yaml", [])


def test_save_resolved_round_trips(tmp_path: Path) -> None:
    cfg = validate(load_config(None, ["task.name=pick_cube", "collect.episodes=3", "cluster.num_cpus=2"]))
    path = save_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path, []) == cfg
    assert not [p for p in path.parent.iterdir() if p.name != "config.yaml"]  # no temp file left


# --- the contract ------------------------------------------------------------------------------

# Every config key /work/shared/design.md lists ("Config keys (contract)"), with a value to set it to
# on the command line: renaming one, or breaking its override, breaks users' files and scripts.
CONTRACT_KEYS = [
    pytest.param("run.dir", "/tmp/vla-dist-contract/run", "/tmp/vla-dist-contract/run", id="run.dir"),
    pytest.param("run.seed", "7", 7, id="run.seed"),
    pytest.param("model.preset", "tiny-openvla", "tiny-openvla", id="model.preset"),
    # read and checked at load: a missing directory is refused naming the key (test_models.py loads a real one)
    pytest.param("model.pretrained", "/nonexistent/policy", ConfigError, id="model.pretrained"),
    pytest.param("model.pretrained", "null", None, id="model.pretrained=null"),
    pytest.param("task.name", "push_cube", "push_cube", id="task.name"),
    pytest.param("collect.episodes", "5", 5, id="collect.episodes"),
    pytest.param("collect.num_actors", "3", 3, id="collect.num_actors"),
    pytest.param("collect.envs_per_actor", "4", 4, id="collect.envs_per_actor"),
    pytest.param("data.dir", "/tmp/vla-dist-contract/data", "/tmp/vla-dist-contract/data", id="data.dir"),
    pytest.param("train.steps", "11", 11, id="train.steps"),
    pytest.param("train.world_size", "2", 2, id="train.world_size"),
    pytest.param("train.zero_stage", "3", 3, id="train.zero_stage"),
    pytest.param("train.lora.enabled", "true", True, id="train.lora.enabled"),
    pytest.param("train.save_every", "5", 5, id="train.save_every"),
    pytest.param("train.resume", "auto", "auto", id="train.resume=auto"),
    pytest.param("train.resume", "never", "never", id="train.resume=never"),
    pytest.param("train.resume", "/runs/a/checkpoints/step_4", "/runs/a/checkpoints/step_4", id="train.resume=DIR"),
    pytest.param("train.eval_every", "0", 0, id="train.eval_every"),
    pytest.param("eval.episodes", "6", 6, id="eval.episodes"),
    pytest.param("eval.checkpoint", "/runs/a/checkpoints", "/runs/a/checkpoints", id="eval.checkpoint"),
    pytest.param("cluster.address", "auto", "auto", id="cluster.address"),
    pytest.param("cluster.address", "null", None, id="cluster.address=null"),
    pytest.param("rl.iterations", "3", 3, id="rl.iterations"),
    pytest.param("rl.algorithm", "grpo", "grpo", id="rl.algorithm=grpo"),
    pytest.param("rl.algorithm", "ppo", "ppo", id="rl.algorithm=ppo"),
]


def _schema_field(path: str) -> dataclasses.Field:
    """The schema's field for a dotted key of any depth (`train.lora.enabled`); fails naming the part."""
    section: type = RunConfig
    field = None
    for part in path.split("."):
        assert dataclasses.is_dataclass(section), f"{path}: {field.name if field else ''} has no sub-keys"
        fields = {f.name: f for f in dataclasses.fields(section)}
        assert part in fields, f"{path}: no key {part!r} in {section.__name__} (has {sorted(fields)})"
        field = fields[part]
        section = field.default_factory if field.default_factory is not dataclasses.MISSING else type(None)
    assert field is not None
    return field


@pytest.mark.parametrize(("key", "override", "expected"), CONTRACT_KEYS)
def test_contract_key_exists_and_overrides(key: str, override: str, expected: object) -> None:
    _schema_field(key)
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_config(None, [f"{key}={override}"])
        return
    cfg = load_config(None, [f"{key}={override}"])
    value: object = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


def test_contract_key_walk_fails_on_a_missing_key() -> None:
    """The walk above can fail: a missing leaf, a missing section, and a key below a leaf."""
    with pytest.raises(AssertionError, match="no key 'nope'"):
        _schema_field("train.lora.nope")
    with pytest.raises(AssertionError, match="no key 'nope'"):
        _schema_field("nope.enabled")
    with pytest.raises(AssertionError, match="has no sub-keys"):
        _schema_field("train.steps.more")


@pytest.mark.parametrize("resume", ["auto", "never"])
def test_contract_resume_modes_validate(resume: str) -> None:
    assert validate(load_config(None, [f"train.resume={resume}"])).train.resume == resume


# --- every bad config exits 2 with the full key path -------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("collect.episdoes=3", "collect.episdoes"),
        ("collect.episodes=abc", "collect.episodes"),
        ("collect.episodes=-1", "collect.episodes"),
        ("collect.num_actors=0", "collect.num_actors"),
        ("collect.action_noise=0.2", "collect.action_noise"),  # 20 cm per step: not a perturbation
        ("task.image_size=33", "task.image_size"),
        ("task.cameras=[front,front]", "task.cameras"),
        ("sim.dt=0.03", "task.control_hz"),
        ("data.shard_max_bytes=5", "data.shard_max_bytes"),
        ("cluster.address=''", "cluster.address"),
    ],
)
def test_bad_override_exits_2_naming_key(override: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in _config_error(["collect", override], capsys)


def test_unknown_key_lists_section_keys(capsys: pytest.CaptureFixture[str]) -> None:
    err = _config_error(["config", "collect.episdoes=3"], capsys)
    assert "unknown key" in err and "episodes, num_actors" in err


def test_unknown_key_in_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path / "bad.yaml", "collect:\n  episodes: 3\n  num_actorz: 2\n")
    err = _config_error(["collect", "--config", str(bad)], capsys)
    assert "collect.num_actorz" in err and str(bad) in err


def test_unknown_task_lists_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    err = _config_error(["collect", "task.name=open_drawer"], capsys)
    assert "task.name" in err
    assert all(name in err for name in ("pick_cube", "push_cube", "stack_cube"))


@pytest.mark.parametrize("name", ["push_cube,push_cube", "push_cube,open_drawer", "all,pick_cube", ""])
def test_several_tasks_each_known_once(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "task.name" in _config_error(["collect", f"task.name={name}"], capsys)


def test_several_tasks_spread_episodes_in_their_order() -> None:
    from vla_dist.rollout.episodes import selected_tasks
    from vla_dist.rollout.evaluate import eval_requests

    cfg = validate(load_config(None, ["task.name=push_cube, stack_cube"]))
    assert selected_tasks(cfg.task.name) == ["push_cube", "stack_cube"]
    tasks, requests = eval_requests(cfg, 2)
    assert tasks == ["push_cube", "stack_cube"] and [r.task for r in requests] == tasks * 2


def test_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = _write(tmp_path / "data", "x")
    err = _config_error(["collect", f"data.dir={not_a_dir}"], capsys)
    assert "data.dir" in err and str(not_a_dir) in err


OUTPUT_DIR_KEYS = ("run.dir", "data.dir", "cluster.cache_dir")  # every key naming a directory we write


@pytest.mark.parametrize("key", OUTPUT_DIR_KEYS)
def test_output_dir_under_a_file_exits_2(key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = _write(tmp_path / "a-file", "x")
    for bad in (a_file / "x", a_file / "x" / "y"):
        err = _config_error(["collect", f"{key}={bad}"], capsys)
        assert key in err and f"lies under {str(a_file)!r}, which is not a directory" in err
    assert a_file.read_text() == "x"
    # what can be created still validates: a new directory below a directory, a symlink to one
    (tmp_path / "link").symlink_to(tmp_path)
    for good in (tmp_path / "new" / "deeper", tmp_path / "link" / "new"):
        assert value_at(validate(load_config(None, [f"{key}={good}"])), key) == str(good)


def test_dir_under_dev_null_exits_2_before_any_work(tmp_path: Path) -> None:
    """The command a user typed (a directory under a character device), as a process: exit 2 naming
    the key, and nothing written (no run.dir/config.yaml, which the command writes before Ray starts)."""
    done = subprocess.run(
        [sys.executable, "-m", "vla_dist", "collect", "data.dir=/dev/null/x", f"run.dir={tmp_path / 'run'}"],
        check=False, capture_output=True, text=True, env=_subprocess_env(), timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: data.dir: ") and "'/dev/null'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_malformed_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert "collect.episodes" in _config_error(["collect", "collect.episodes"], capsys)


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _config_error(["collect", "--config", str(missing)], capsys)


def test_config_error_before_heavy_work(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vla_dist", "collect", "collect.episodes=-1", f"run.dir={tmp_path / 'run'}"],
        check=False, capture_output=True, text=True, env=_subprocess_env(), timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "collect.episodes" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a bad config


def test_loading_imports_no_heavy_library() -> None:
    code = (
        "import sys, vla_dist.cli\n"
        "from vla_dist.config import load_config, validate\n"
        "validate(load_config(None, []))\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env=_subprocess_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- usage and dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--help"], ("collect", "bench", "config")),
        (["collect", "--help"], ("Genesis", "shards", "--config", "KEY=VALUE")),
        (["bench", "--help"], ("rollout", "codec", "JSON")),
    ],
)
def test_help_exits_0(args: list[str], words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in words)


def test_submit_offers_only_commands_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """`vla-dist submit --help` lists the commands a job can run; each must be a vla-dist command
    and one that is not is refused (exit 2) before any connection is tried."""
    import argparse

    from vla_dist.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert main(["submit", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    offered = help_text.split("COMMAND ", 2)[2].split(" or 'bench NAME'")[0].strip(" ,").split(", ")
    assert offered == ["collect", "train", "eval", "rl"] and all(name in commands for name in [*offered, "bench"])
    err = _config_error(["submit", "quickstart", "cluster.dashboard_address=http://127.0.0.1:9"], capsys)
    assert "cannot submit 'quickstart'; one of: collect, train, eval, rl, bench" in err
    err = _config_error(["cluster", "render", "slurm", "--job", "replay", "--out", "/nonexistent/out"], capsys)
    assert "cannot run 'replay' as a cluster job" in err


def test_render_slurm_without_out_writes_under_the_configs_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --out: the job's files go to RUN_DIR/slurm of the config given (docs/multinode.md; a run's
    files live under its run.dir), never under the quickstart's runs/quickstart."""
    monkeypatch.chdir(tmp_path)
    mine = _write(tmp_path / "mine.yaml", "run:\n  dir: runs/mine\n")
    assert main(["cluster", "render", "slurm", "--config", str(mine), "--job", "train"]) == 0
    assert "submit: sbatch runs/mine/slurm/vla-dist.sbatch" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["mine.yaml", "runs/mine/slurm/config.yaml", "runs/mine/slurm/vla-dist.sbatch"]
    assert load_config(tmp_path / "runs/mine/slurm/config.yaml", []).run.dir == "runs/mine"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nope"]) == 2
    assert "rollout" in capsys.readouterr().err and main([]) == 2


def test_config_command_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "collect.episodes=4", "--config", "configs/quickstart.yaml", "task.image_size=32"]) == 0
    out = capsys.readouterr().out
    assert "episodes: 4" in out and "image_size: 32" in out


def test_bench_prints_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codec", "task.image_size=32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"name", "value", "unit", "baseline", "ratio", "device"} <= set(report)
    assert report["name"] == "codec" and report["ratio"] == pytest.approx(report["baseline"] / report["value"])


def test_runtime_failure_exits_1_naming_what_failed(capsys: pytest.CaptureFixture[str]) -> None:
    # /proc cannot hold a data directory: a real runtime failure, raised before any Ray or sim work.
    assert main(["collect", "data.dir=/proc/vla-dist-test/data", "run.dir=/proc/vla-dist-test/run"]) == 1
    err = capsys.readouterr().err
    assert "/proc/vla-dist-test" in err and "--debug" in err
    with pytest.raises(OSError):  # --debug shows the traceback instead of one line
        main(["--debug", "collect", "data.dir=/proc/vla-dist-test/data", "run.dir=/proc/vla-dist-test/run"])


# --- model presets (configs/model/*.yaml) ------------------------------------------------------


def test_model_preset_is_the_base_of_the_model_section(tmp_path: Path) -> None:
    cfg = validate(load_config(None, []))
    assert (cfg.model.preset, cfg.model.family, cfg.model.image_size) == ("tiny-pi0", "pi0", 32)
    assert cfg.model.hf["dit_config"]["hidden_size"] == 64  # from configs/model/tiny-pi0.yaml
    # an override switches the preset file, not only the name; other overrides still win over it
    cfg = validate(load_config(None, ["model.chunk_size=2", "model.preset=tiny-openvla", "model.hf.hidden_size=128"]))
    assert (cfg.model.family, cfg.model.chunk_size, cfg.model.hf["model_type"]) == ("action_tokens", 2, "paligemma")
    assert "dit_config" not in cfg.model.hf  # the tiny-pi0 architecture is not merged in
    # a file's own model keys win over its preset
    mine = _write(tmp_path / "mine.yaml", "model:\n  preset: tiny-openvla\n  chunk_size: 1\n")
    cfg = validate(load_config(mine, []))
    assert (cfg.model.family, cfg.model.chunk_size) == ("action_tokens", 1)
    assert load_config(save_resolved(cfg, tmp_path / "run"), []) == cfg  # the resolved file reloads equal


def test_full_size_presets_load_without_torch() -> None:
    for preset in ("pi0-3b", "openvla-7b"):
        cfg = validate(load_config(None, [f"model.preset={preset}"]))
        assert cfg.model.image_size == 224 and cfg.model.dtype == "bfloat16"


def test_unknown_preset_exits_2_listing_presets(capsys: pytest.CaptureFixture[str]) -> None:
    err = _config_error(["config", "model.preset=nope"], capsys)
    assert "model.preset" in err and "nope" in err
    assert all(name in err for name in ("tiny-pi0", "tiny-openvla", "pi0-3b", "openvla-7b"))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.family=action_tokens", "model.hf"),  # tiny-pi0's PI0 architecture under the token family
        ("model.family=diffusion", "model.family"),
        ("model.image_size=36", "model.image_size"),  # not a multiple of the 8-pixel patches
        ("model.dtype=float16", "model.dtype"),
        ("model.chunk_size=0", "model.chunk_size"),
        ("model.lora_targets='(q_proj'", "model.lora_targets"),
        ("model.hf=3", "model.hf"),
    ],
)
def test_bad_model_values_exit_2(override: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in _config_error(["config", override], capsys)


def test_broken_pretrained_dir_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    err = _config_error(["config", f"model.pretrained={missing}"], capsys)
    assert "model.pretrained" in err and str(missing) in err
    partial = tmp_path / "partial"
    partial.mkdir()
    for name, text in [("config.json", '{"model_type": "pi0"}'), ("normalization.json", "{}"),
                       ("tokenizer.json", "{}"),
                       ("vla_dist.json", json.dumps({"family": "pi0", "chunk_size": 8, "action_dim": 7, "state_dim": 15,
                                                     "cameras": ["front"], "image_size": 32, "max_text_tokens": 8}))]:
        (partial / name).write_text(text)
    err = _config_error(["config", f"model.pretrained={partial}"], capsys)
    assert "model.pretrained" in err and str(partial / "model.safetensors") in err
    (partial / "vla_dist.json").write_text("{}")
    err = _config_error(["config", f"model.pretrained={partial}"], capsys)
    assert "model.pretrained" in err and "vla_dist.json" in err and "family" in err


@pytest.mark.parametrize("recipe", sorted((PROJECT_ROOT / "configs" / "recipe").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_configs_compose_and_validate(recipe: Path, tmp_path: Path) -> None:
    """Every recipe the README and docs/recipes.md tell users to run composes (its defaults chain)
    and passes validation; a renamed key or a bad value in a recipe fails here, not after a
    20-minute collection."""
    cfg = validate(load_config(recipe, [f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}"]))
    from vla_dist.rollout.episodes import selected_tasks

    assert cfg.eval.episodes * len(selected_tasks(cfg.task.name)) >= 30
    if recipe.stem in ("sft-pick", "sft-all", "rl-pick", "base-pick"):  # the recipes that succeed, as measured
        assert cfg.model.state_inputs == ["gripper_width"] and cfg.data.random_shift > 0
        assert cfg.train.steps >= 1000
        return
    # a comparison recipe (vla-dist recipes): changes something of the baseline's, at its budget
    from vla_dist.config import to_yaml
    from vla_dist.recipes.run import samples_trained

    def recipe_config(name: str):
        return validate(load_config(PROJECT_ROOT / "configs" / "recipe" / f"{name}.yaml",
                                    [f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}"]))

    base = recipe_config("base-pick")
    assert to_yaml(cfg) != to_yaml(base)
    if cfg.recipes.baseline == recipe.stem:  # the baseline of a comparison of its own (a weak start for RL):
        assert cfg.recipes.dir != base.recipes.dir  # base-pick trained for fewer steps, in another recipes.dir
        assert 0 < cfg.train.steps < base.train.steps
        from dataclasses import asdict

        ours, theirs = asdict(cfg), asdict(base)
        changed = {f"{section}.{key}" for section, values in ours.items() if isinstance(values, dict)
                   for key, value in values.items() if theirs[section][key] != value}
        assert changed <= {"train.steps", "train.save_every", "run.dir", "recipes.dir", "recipes.baseline"}
        return
    assert cfg.train.steps >= 1000
    base = recipe_config(cfg.recipes.baseline)  # what this recipe is compared with
    if cfg.recipes.start_from and cfg.select.pool is None:  # a continuation (rl, dagger, more SFT): its budget
        assert cfg.recipes.start_from in ("base-pick", "task-push-stack", "base-pick-short")  # comes on top
        if cfg.model.retarget:  # re-targeting: to another action space than its start's, on few demonstrations
            assert cfg.sim.action_space != base.sim.action_space and cfg.collect.episodes < base.collect.episodes
        return
    if cfg.select.pool is not None:  # active data selection: the start's policy scores, it trains anew on its choice
        start = cfg.recipes.start_from
        assert start is None or (PROJECT_ROOT / "configs" / "recipe" / f"{start}.yaml").is_file()
        baseline_data = load_config(PROJECT_ROOT / "configs" / "recipe" / "base-pick.yaml", []).data.dir
        assert cfg.select.episodes < base.collect.episodes and cfg.select.pool == baseline_data  # its demonstrations
    assert samples_trained(cfg) == samples_trained(base) and cfg.collect.episodes <= base.collect.episodes
    if cfg.collect.episodes < base.collect.episodes:  # a few-demonstration control: a continuation trains on the same
        assert recipe.stem in ("embodiment-joint-few", "task-pick-few")
