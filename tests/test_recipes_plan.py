"""`vla-dist recipes`: the plan (order, directories, seeds, what each stage reads), the checks that fail
before anything runs (budgets, unknown or cyclic recipes, bad keys), and the report's arithmetic
(pooling over seeds, Wilson intervals, an effect only where the intervals separate). The same
commands run for real at tiny size in tests/test_recipes_run.py."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from vla_dist.cli import main
from vla_dist.config import ConfigError, load_config, validate
from vla_dist.recipes.report import collect_rows, markdown, paired_text, write_report
from vla_dist.recipes.run import (
    baseline_name,
    check_budgets,
    ordered,
    plan,
    recipe_file,
    record_comparison,
    samples_trained,
    stage_config,
)
from vla_dist.rollout.evaluate import wilson_interval
from vla_dist.stages import dependents, set_aside


def _base(*overrides: str):
    return validate(load_config(recipe_file("base-pick"), list(overrides)))


def test_the_recipes_files_name_their_comparisons_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The weak-start RL recipes declare base-pick-short (base-pick stopped early) as their baseline: the
    comparison runs it first, in its own recipes.dir, and the RL stages read its policy. A recipe of another
    baseline beside them is refused before anything runs; the command line's recipes.baseline wins."""
    assert baseline_name([], ["rl-short-critic", "rl-short-state-critic"]) == "base-pick-short"
    assert baseline_name([], ["perception-jitter"]) == baseline_name([]) == "base-pick"
    assert baseline_name(["recipes.baseline=base-pick"], ["rl-short-critic"]) == "base-pick"
    with pytest.raises(ConfigError) as error:
        baseline_name([], ["rl-short-critic", "perception-jitter"])
    assert error.value.key == "recipes.baseline" and "rl-short-critic -> base-pick-short" in str(error.value)
    assert main(["recipes", "run", "rl-short-critic", "perception-jitter", f"recipes.dir={tmp_path}"]) == 2
    assert "recipes.baseline" in capsys.readouterr().err and not any(tmp_path.iterdir())

    short = validate(load_config(recipe_file("base-pick-short"), []))
    base = _base()
    assert short.recipes.dir != base.recipes.dir and short.train.steps < base.train.steps
    assert short.collect.episodes == base.collect.episodes and short.data.dir == base.data.dir
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[5]"]
    recipes = ordered(["rl-short-critic", "rl-short-state-critic"], short.recipes.baseline, overrides)
    assert list(recipes) == ["base-pick-short", "rl-short-critic", "rl-short-state-critic"]
    # one `recipes run` composes each recipe once: what baseline_name composed to read the declared
    # baseline is what ordered returns, the same configs as composed afresh
    composed: dict = {}
    assert baseline_name(overrides, ["rl-short-critic", "rl-short-state-critic"], composed) == "base-pick-short"
    reused = ordered(["rl-short-critic", "rl-short-state-critic"], "base-pick-short", overrides, composed)
    assert reused["rl-short-critic"] is composed["rl-short-critic"]
    assert {n: asdict(c) for n, c in reused.items()} == {n: asdict(c) for n, c in recipes.items()}
    check_budgets(recipes, "base-pick-short")
    stages = {(s.recipe, s.name): s for s in plan(recipes, validate(load_config(recipe_file("base-pick-short"),
                                                                                 overrides)))}
    start = tmp_path / "base-pick-short" / "seed_5" / "eval-default" / "policy"
    for name in ("rl-short-critic", "rl-short-state-critic"):
        assert f"model.pretrained={start}" in stages[(name, "rl")].overrides
    assert recipes["rl-short-state-critic"].recipes.control == "rl-short-critic"
    assert recipes["rl-short-state-critic"].rl.value_inputs == ["features", "state"]


def test_plan_runs_the_baseline_first_and_rl_after_the_policy_it_starts_from(tmp_path: Path) -> None:
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[3,4]",
                 "recipes.evals={default: [], new_phrasing: ['task.paraphrases=[3]']}"]
    recipes = ordered(["rl-ppo", "perception-jitter"], "base-pick", overrides)
    assert list(recipes) == ["base-pick", "rl-ppo", "perception-jitter"]
    stages = plan(recipes, _base(*overrides))
    names = [(s.recipe, s.seed, s.name) for s in stages]
    # collection once per SFT recipe, seed-independent; then per seed every recipe's run and evals
    assert names[:2] == [("base-pick", None, "collect"), ("perception-jitter", None, "collect")]
    per_seed = [("base-pick", "train"), ("base-pick", "eval-default"), ("base-pick", "eval-new_phrasing"),
                ("rl-ppo", "rl"), ("rl-ppo", "eval-default"), ("rl-ppo", "eval-new_phrasing"),
                ("perception-jitter", "train"), ("perception-jitter", "eval-default"),
                ("perception-jitter", "eval-new_phrasing")]
    assert names[2:] == [(r, seed, n) for seed in (3, 4) for r, n in per_seed]
    by_name = {(s.recipe, s.seed, s.name): s for s in stages}
    rl = by_name[("rl-ppo", 4, "rl")]
    assert f"model.pretrained={tmp_path / 'base-pick' / 'seed_4' / 'eval-default' / 'policy'}" in rl.overrides
    assert "run.seed=4" in rl.overrides and rl.overrides[-1] == f"run.dir={tmp_path / 'rl-ppo' / 'seed_4' / 'rl'}"
    first = by_name[("perception-jitter", 3, "eval-default")]
    assert f"eval.checkpoint={tmp_path / 'perception-jitter' / 'seed_3' / 'train'}" in first.overrides
    second = by_name[("perception-jitter", 3, "eval-new_phrasing")]
    exported = tmp_path / "perception-jitter" / "seed_3" / "eval-default" / "policy"
    assert f"eval.checkpoint={exported}" in second.overrides
    assert "task.paraphrases=[3]" in second.overrides
    # collection keeps the recipe's own run.seed: a dataset does not depend on which seed ran first
    assert not any(o.startswith("run.seed=") for o in by_name[("base-pick", None, "collect")].overrides)


def test_dagger_continues_the_baseline_and_is_evaluated_on_its_own_policy(tmp_path: Path) -> None:
    """recipes.command=dagger: its stage is `vla-dist dagger` from the baseline's exported policy at the
    same seed; its evaluations read the policy the last round exported (dagger/policy), and a recipe
    continuing it starts there. A continuing SFT recipe (sft-continue) is not held to the baseline's
    budget: it spends one on top, reported."""
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[2]"]
    recipes = ordered(["dagger", "sft-continue"], "base-pick", overrides)
    check_budgets(recipes, "base-pick")  # sft-continue trains 1500 steps on top of base-pick's: allowed
    stages = {(s.recipe, s.name): s for s in plan(recipes, _base(*overrides))}
    assert [name for recipe, name in stages if recipe == "dagger"] == ["dagger", "eval-default"]
    dagger, evaluation = stages[("dagger", "dagger")], stages[("dagger", "eval-default")]
    baseline_policy = tmp_path / "base-pick" / "seed_2" / "eval-default" / "policy"
    assert dagger.command == "dagger" and f"model.pretrained={baseline_policy}" in dagger.overrides
    assert f"eval.checkpoint={tmp_path / 'dagger' / 'seed_2' / 'dagger' / 'policy'}" in evaluation.overrides
    assert f"model.pretrained={baseline_policy}" in stages[("sft-continue", "train")].overrides
    config = _recipe_config_for(dagger)
    assert (config.dagger.rounds, config.dagger.episodes_per_round, config.dagger.train_steps) == (3, 32, 500)


def _recipe_config_for(stage):
    return validate(load_config(recipe_file(stage.recipe), [*stage.overrides, "model.pretrained=null"]))


def test_recipes_with_another_budget_or_a_missing_start_fail_before_anything_runs(tmp_path: Path) -> None:
    recipes = ordered(["perception-jitter"], "base-pick", [f"recipes.dir={tmp_path}"])
    check_budgets(recipes, "base-pick")  # same samples: fine
    assert samples_trained(recipes["base-pick"]) == 2500 * 32
    recipes["perception-jitter"].train.steps = 3000
    with pytest.raises(ConfigError, match=r"train.steps.*80,000"):
        check_budgets(recipes, "base-pick")
    recipes["perception-jitter"].train.steps = 2500
    recipes["perception-jitter"].collect.episodes = 400
    with pytest.raises(ConfigError, match="collect.episodes"):
        check_budgets(recipes, "base-pick")
    with pytest.raises(ConfigError, match="recipes.start_from.*name it in the same"):
        ordered(["rl-ppo"], "perception-jitter", [])
    with pytest.raises(ConfigError, match="no recipe 'perception-nope'.*perception-jitter"):
        recipe_file("perception-nope")


@pytest.mark.parametrize(("argv", "message"), [
    (["recipes", "run"], "needs at least one recipe name"),
    (["recipes", "run", "perception-jitter", "--config", "configs/quickstart.yaml"], "not --config"),
    (["recipes", "run", "nope"], "no recipe 'nope'"),
    (["recipes", "run", "perception-jitter", "recipes.seeds=[]"], "recipes.seeds"),
    (["recipes", "run", "perception-jitter", "recipes.evals={x: [run.dir=elsewhere]}"], "recipes.evals.x"),
    (["recipes", "run", "perception-jitter", "data.color_jiter=0.1"], "data.color_jiter"),
    (["recipes", "report", "perception-jitter"], "takes no recipe names"),
    (["recipes", "run", "perception-jitter", "recipes.control=nope"], "recipes.control: recipe 'base-pick'"),
])
def test_bad_recipes_commands_exit_2_naming_what_is_wrong(argv: list[str], message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, f"recipes.dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "comparison.json").exists()  # nothing was started


def test_a_later_run_extends_the_comparison_and_keeps_earlier_variants(tmp_path: Path) -> None:
    """A recipe run later with fewer evaluation variants or other seeds adds to comparison.json: the
    report keeps every row finished before (here the held-out phrasing) beside the new recipe's."""
    phrasing = [f"recipes.dir={tmp_path}", "recipes.seeds=[0]",
                "recipes.evals={default: [], new_phrasing: ['task.paraphrases=[3]']}"]
    record_comparison(tmp_path, _base(*phrasing), {
        name: (name, cfg) for name, cfg in ordered(["task-new-phrasing"], "base-pick", phrasing).items()}, phrasing)
    later = [f"recipes.dir={tmp_path}", "recipes.seeds=[1]"]
    record_comparison(tmp_path, _base(*later), {
        name: (name, cfg) for name, cfg in ordered(["rl-ppo"], "base-pick", later).items()}, later)
    record = json.loads((tmp_path / "comparison.json").read_text())
    assert record["evals"] == ["default", "new_phrasing"] and record["seeds"] == [0, 1]
    assert list(record["recipes"]) == ["base-pick", "task-new-phrasing", "rl-ppo"]
    _eval_report(tmp_path / "base-pick" / "seed_0" / "eval-new_phrasing", {"pick_cube": (9, 10)})
    _eval_report(tmp_path / "task-new-phrasing" / "seed_0" / "eval-new_phrasing", {"pick_cube": (2, 10)})
    _eval_report(tmp_path / "rl-ppo" / "seed_1" / "eval-default", {"pick_cube": (5, 10)})
    rows = {(r["recipe"], r["eval"]) for r in collect_rows(tmp_path, record)}
    assert rows == {("base-pick", "new_phrasing"), ("task-new-phrasing", "new_phrasing"), ("rl-ppo", "default")}


def _eval_report(directory: Path, per_task: dict[str, tuple[int, int]], seconds: float = 60.0) -> None:
    directory.mkdir(parents=True)
    report = {"command": "eval", "wall_seconds": seconds,
              "per_task": {task: {"successes": s, "episodes": n} for task, (s, n) in per_task.items()}}
    (directory / "report.json").write_text(json.dumps(report))


def test_report_pools_seeds_and_calls_effects_only_where_intervals_separate(tmp_path: Path) -> None:
    comparison = {"baseline": "base", "seeds": [0, 1], "evals": ["default"],
                  "recipes": {"base": {"start_from": None}, "good": {"start_from": None},
                              "same": {"start_from": None}, "bad": {"start_from": None}}}
    (tmp_path / "comparison.json").write_text(json.dumps(comparison))
    counts = {"base": [(25, 50), (26, 50)], "good": [(45, 50), (47, 50)], "same": [(30, 50), (27, 50)],
              "bad": [(3, 50), (5, 50)]}
    for name, per_seed in counts.items():
        for seed, (wins, n) in enumerate(per_seed):
            _eval_report(tmp_path / name / f"seed_{seed}" / "eval-default", {"pick_cube": (wins, n)})
            train = tmp_path / name / f"seed_{seed}" / "train"
            train.mkdir()
            (train / "report.json").write_text(json.dumps({"steps": 100, "global_batch_size": 32, "wall_s": 30.0}))
    rows = {row["recipe"]: row for row in collect_rows(tmp_path, comparison)}
    assert rows["base"]["successes"] == 51 and rows["base"]["episodes"] == 100
    assert rows["base"]["ci95"] == [round(v, 4) for v in wilson_interval(51, 100)]
    assert rows["good"]["effect"] == "better" and rows["good"]["delta"] == pytest.approx(0.41)
    assert rows["same"]["effect"] == "not separated" and rows["bad"]["effect"] == "worse"
    assert rows["good"]["per_seed"] == {"0": [45, 50], "1": [47, 50]}
    assert rows["good"]["train_samples"] == 2 * 100 * 32 and rows["good"]["wall_s"] == pytest.approx(180.0)
    result = write_report(tmp_path)
    assert result["effects"] == 2
    text = (tmp_path / "recipes.md").read_text()
    assert "| good | all | 92/100 (92%) |" in text and "| +41% | better |" in text
    assert (tmp_path / "recipes.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "recipes.json").read_text())["rows"][0]["effect"] == "baseline"


def test_report_of_a_multi_task_recipe_has_a_pooled_row_and_one_per_task(tmp_path: Path) -> None:
    comparison = {"baseline": "base", "seeds": [0], "evals": ["default"], "recipes": {"base": {}}}
    _eval_report(tmp_path / "base" / "seed_0" / "eval-default", {"pick_cube": (9, 10), "push_cube": (2, 10)})
    rows = collect_rows(tmp_path, comparison)
    assert [(r["task"], r["successes"], r["episodes"]) for r in rows] == [
        ("all", 11, 20), ("pick_cube", 9, 10), ("push_cube", 2, 10)]
    assert "| base | push_cube | 2/10 (20%) |" in markdown({"baseline": "base", "seeds": [0], "evals": ["default"],
                                                             "rows": rows})


def test_report_compares_only_rows_of_the_same_tasks(tmp_path: Path) -> None:
    """A recipe evaluated on other tasks than the baseline's (task-push-stack against a pick baseline)
    gets no difference, effect or paired counts against it; one on the baseline's task does."""
    comparison = {"baseline": "base", "seeds": [0], "evals": ["default"],
                  "recipes": {"base": {}, "two": {}, "pick": {}}}
    _eval_report(tmp_path / "base" / "seed_0" / "eval-default", {"pick_cube": (9, 10)})
    _eval_report(tmp_path / "two" / "seed_0" / "eval-default", {"push_cube": (0, 10), "stack_cube": (0, 10)})
    _eval_report(tmp_path / "pick" / "seed_0" / "eval-default", {"pick_cube": (0, 10)})
    rows = {(r["recipe"], r["task"]): r for r in collect_rows(tmp_path, comparison)}
    assert rows[("two", "all")]["tasks"] == ["push_cube", "stack_cube"]
    for key in (("two", "all"), ("two", "push_cube"), ("two", "stack_cube")):
        assert (rows[key]["delta"], rows[key]["effect"]) == (None, "no baseline"), key
    assert rows[("pick", "all")]["effect"] == "worse" and rows[("pick", "all")]["delta"] == pytest.approx(-0.9)


def test_report_compares_a_recipe_with_its_control_on_the_same_layouts(tmp_path: Path) -> None:
    """recipes.control: the row's difference, effect and paired counts against its control recipe (the
    same budget without what it adds); rows without a control, or whose control has not run, get none."""
    comparison = {"baseline": "base", "seeds": [0], "evals": ["default"],
                  "recipes": {"base": {}, "few": {}, "transfer": {"control": "few"}, "orphan": {"control": "gone"}}}
    won = {"base": range(7), "few": range(2), "transfer": range(9), "orphan": range(5)}
    for name, wins in won.items():
        directory = tmp_path / name / "seed_0" / "eval-default"
        _eval_report(directory, {"pick_cube": (len(wins), 10)})
        report = json.loads((directory / "report.json").read_text())
        report["outcomes"] = [{"index": i, "task": "pick_cube", "seed": i, "success": i in wins} for i in range(10)]
        (directory / "report.json").write_text(json.dumps(report))
    (tmp_path / "comparison.json").write_text(json.dumps(comparison))
    rows = {r["recipe"]: r for r in collect_rows(tmp_path, comparison)}
    against = rows["transfer"]["vs_control"]
    assert against["recipe"] == "few" and against["delta"] == pytest.approx(0.7) and against["effect"] == "better"
    assert against["paired"] == {"episodes": 10, "lost": 0, "gained": 7, "p": 0.0156}
    assert rows["transfer"]["effect"] == "not separated"  # against the baseline: 9/10 vs 7/10
    assert rows["few"]["vs_control"] is None and rows["orphan"]["vs_control"] is None
    write_report(tmp_path)
    assert "| few: +70%, better, -0/+7 (0.016) |" in (tmp_path / "recipes.md").read_text()


def test_report_pairs_episodes_on_the_same_layouts(tmp_path: Path) -> None:
    """With per-episode outcomes (eval report.json "outcomes"), each row counts the layouts it lost and
    gained against the baseline in the same scene and against its own first-eval result, pooled over
    seeds, with the exact McNemar p-value; evaluations without outcomes get no paired counts."""
    comparison = {"baseline": "base", "seeds": [0, 1], "evals": ["default", "perturbed"],
                  "recipes": {"base": {}, "robust": {}, "old": {}}}
    (tmp_path / "comparison.json").write_text(json.dumps(comparison))
    # successes by episode index, per (recipe, eval), the same at both seeds; 10 layouts each
    wins = {("base", "default"): {0, 1, 2, 3, 4, 5, 6, 7}, ("base", "perturbed"): {0, 1, 2},
            ("robust", "default"): {0, 1, 2, 3, 4, 5, 6, 8}, ("robust", "perturbed"): {0, 1, 2, 3, 4, 5, 9}}
    for (name, variant), won in wins.items():
        for seed in (0, 1):
            directory = tmp_path / name / f"seed_{seed}" / f"eval-{variant}"
            _eval_report(directory, {"pick_cube": (len(won), 10)})
            report = json.loads((directory / "report.json").read_text())
            report["outcomes"] = [{"index": i, "task": "pick_cube", "seed": 1000 + i, "success": i in won}
                                  for i in range(10)]
            (directory / "report.json").write_text(json.dumps(report))
    _eval_report(tmp_path / "old" / "seed_0" / "eval-perturbed", {"pick_cube": (5, 10)})  # recorded no outcomes
    rows = {(r["recipe"], r["eval"]): r for r in collect_rows(tmp_path, comparison)}
    assert rows[("base", "default")]["paired_vs_baseline"] is None
    assert rows[("robust", "default")]["paired_vs_baseline"] == {"episodes": 20, "lost": 2, "gained": 2, "p": 1.0}
    # perturbed, against the baseline in the perturbed scene: robust keeps 3, 4, 5, 9 that base lost
    assert rows[("robust", "perturbed")]["paired_vs_baseline"] == {
        "episodes": 20, "lost": 0, "gained": 8, "p": 0.00781}
    # what the perturbed scene cost each recipe on its own default-scene successes
    assert rows[("base", "perturbed")]["paired_vs_default"] == {"episodes": 20, "lost": 10, "gained": 0,
                                                                 "p": 0.00195}  # 2 / 2**10
    assert rows[("robust", "perturbed")]["paired_vs_default"]["lost"] == 4
    assert rows[("robust", "perturbed")]["paired_vs_default"]["gained"] == 2
    assert rows[("old", "perturbed")]["paired_vs_baseline"] is None
    assert rows[("old", "perturbed")]["paired_vs_default"] is None
    assert all("_outcomes" not in row for row in rows.values())
    # an eval of another task on the same indices shares no layouts with the default eval: not paired
    directory = tmp_path / "base" / "seed_0" / "eval-blue"
    _eval_report(directory, {"pick_blue_cube": (2, 10)})
    report = json.loads((directory / "report.json").read_text())
    report["outcomes"] = [{"index": i, "task": "pick_blue_cube", "seed": 1000 + i, "success": i < 2}
                          for i in range(10)]
    (directory / "report.json").write_text(json.dumps(report))
    other_task = {**comparison, "seeds": [0], "evals": ["default", "blue"]}
    blue = next(r for r in collect_rows(tmp_path, other_task) if r["eval"] == "blue")
    assert blue["successes"] == 2 and blue["paired_vs_default"] is None
    write_report(tmp_path)
    text = (tmp_path / "recipes.md").read_text()
    assert "| robust | all | 14/20 (70%) |" in text and "| -0/+8 (0.0078) | -4/+2 (0.69) |" in text
    assert "| base | all | 6/20 (30%) |" in text and "| -10/+0 (0.0019) |" in text
    assert paired_text({"lost": 41, "gained": 0, "p": 1e-12}) == "-41/+0 (<0.001)"


def test_selection_recipes_choose_per_seed_with_the_starting_policy_and_train_anew(tmp_path: Path) -> None:
    """A recipe with select.pool has a `vla-dist select` stage per seed instead of a collection: the
    first (select-seed) draws at random; select-loss and select-random start from it: its policy scores
    (loss only: random needs none), its data is excluded from the choice and kept ahead of it, and
    their training starts from scratch on their own seed's choice at the baseline's budget."""
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[5]"]
    recipes = ordered(["select-loss", "select-random", "select-seed"], "base-pick", overrides)
    assert list(recipes) == ["base-pick", "select-seed", "select-loss", "select-random"]
    check_budgets(recipes, "base-pick")
    stages = plan(recipes, _base(*overrides))
    assert [(s.recipe, s.name) for s in stages if s.seed is None] == [("base-pick", "collect")]
    by_name = {(s.recipe, s.name): s for s in stages}
    seed_dir = tmp_path / "select-seed" / "seed_5"
    first = by_name[("select-seed", "select")]
    assert not any(o.startswith(("select.exclude", "select.keep", "eval.checkpoint")) for o in first.overrides)
    assert f"data.dir={seed_dir / 'data'}" in first.overrides and "run.seed=5" in first.overrides
    scored = by_name[("select-loss", "select")]
    assert f"eval.checkpoint={seed_dir / 'eval-default' / 'policy'}" in scored.overrides
    assert scored.made_earlier == ("eval.checkpoint",)
    assert f"select.exclude=[{seed_dir / 'data'}]" in scored.overrides
    assert f"select.keep=[{seed_dir / 'data'}]" in scored.overrides
    assert not any(o.startswith("eval.checkpoint") for o in by_name[("select-random", "select")].overrides)
    train = by_name[("select-loss", "train")]
    assert f"data.dir={tmp_path / 'select-loss' / 'seed_5' / 'data'}" in train.overrides
    assert not any(o.startswith("model.pretrained") for o in train.overrides)
    order = [(s.recipe, s.name) for s in stages]
    assert order.index(("select-seed", "eval-default")) < order.index(("select-loss", "select"))
    assert order.index(("select-loss", "select")) < order.index(("select-loss", "train"))
    # the stages' configs hold together before anything runs (the scoring policy is made earlier)
    config = validate(load_config(recipe_file("select-loss"), [*scored.overrides, "eval.checkpoint=null"]))
    assert (config.select.score, config.select.episodes) == ("loss", 64)


def test_a_stage_run_again_sets_aside_what_was_made_from_its_output(tmp_path: Path) -> None:
    """A stage that runs again (train.steps raised: it resumes; a dataset collected anew) makes earlier
    results of the stages after it stale: an evaluation of the old policy would otherwise be kept as
    the new one's, and an RL run would have started from the old policy. `dependents` finds them
    through the paths the stages read and write; `set_aside` moves their output to PATH.stale."""
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[0]",
                 "recipes.evals={default: [], other: ['sim.distractor=true']}"]
    recipes = ordered(["rl-ppo", "perception-jitter", "select-seed", "select-loss"], "base-pick", overrides)
    stages = plan(recipes, _base(*overrides))
    configs = [stage_config(s.recipe, s, overrides, up_front=True) for s in stages]
    index = {(s.recipe, s.name): i for i, s in enumerate(stages)}
    after = dependents(stages, configs)

    def made_from(recipe: str, name: str) -> set[tuple[str, str]]:
        return {(stages[j].recipe, stages[j].name) for j in after[index[(recipe, name)]]}

    base_runs = {("base-pick", "eval-default"), ("base-pick", "eval-other"), ("rl-ppo", "rl"),
                 ("rl-ppo", "eval-default"), ("rl-ppo", "eval-other")}
    assert made_from("base-pick", "train") == base_runs
    assert made_from("base-pick", "eval-default") == base_runs - {("base-pick", "eval-default")}
    assert made_from("perception-jitter", "train") == {("perception-jitter", "eval-default"),
                                                       ("perception-jitter", "eval-other")}
    assert made_from("rl-ppo", "eval-other") == set()
    # select-loss's choice is scored by select-seed's policy and keeps select-seed's chosen data
    seeded = made_from("select-seed", "select")
    assert {("select-seed", "train"), ("select-loss", "select"), ("select-loss", "train")} <= seeded
    assert made_from("select-seed", "train") >= {("select-loss", "select"), ("select-loss", "eval-default")}
    assert not any(recipe == "base-pick" for recipe, _ in seeded)
    # the collected dataset: every training on it and every selection from it
    collected = made_from("base-pick", "collect")
    assert {("base-pick", "train"), ("perception-jitter", "train"), ("select-seed", "select")} <= collected

    rl = index[("rl-ppo", "rl")]
    run_dir = Path(configs[rl].run.dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "report.json").write_text("{}")
    stale = run_dir.with_name("rl.stale")
    stale.mkdir()
    (stale / "older").write_text("")
    lines: list[str] = []
    set_aside("rl", configs[rl], lines.append)
    assert not run_dir.exists() and (stale / "report.json").is_file() and not (stale / "older").exists()
    assert str(stale) in lines[0]
    set_aside("rl", configs[rl], lines.append)  # nothing there: nothing moved
    assert len(lines) == 1 and (stale / "report.json").is_file()


def test_a_scoring_selection_without_a_policy_to_score_fails_up_front(tmp_path: Path) -> None:
    overrides = [f"recipes.dir={tmp_path}", "recipes.seeds=[0]", "recipes.start_from=null"]
    recipes = ordered(["select-loss"], "base-pick", overrides)
    with pytest.raises(ConfigError, match="recipes.start_from"):
        plan(recipes, _base(*overrides))


def test_a_recipe_at_fewer_seeds_is_compared_with_the_baseline_at_its_seeds(tmp_path: Path) -> None:
    """The baseline ran seeds 0 and 1, the recipe only 0: its difference is against the baseline's seed
    0 (20/50 -> 40/50: +40 points, separated), not against both seeds pooled (60/100: +20, overlapping).
    Episodes that lifted the cube the instruction did not name are counted and shown."""
    comparison = {"baseline": "base", "seeds": [0, 1], "evals": ["default"],
                  "recipes": {"base": {"start_from": None}, "late": {"start_from": None}}}
    (tmp_path / "comparison.json").write_text(json.dumps(comparison))
    _eval_report(tmp_path / "base" / "seed_0" / "eval-default", {"pick_cube": (20, 50)})
    _eval_report(tmp_path / "base" / "seed_1" / "eval-default", {"pick_cube": (40, 50)})
    _eval_report(tmp_path / "late" / "seed_0" / "eval-default", {"pick_cube": (40, 50)})
    report = json.loads((tmp_path / "late" / "seed_0" / "eval-default" / "report.json").read_text())
    report["per_task"]["pick_cube"]["other_cube_lifted"] = 3
    (tmp_path / "late" / "seed_0" / "eval-default" / "report.json").write_text(json.dumps(report))
    rows = {row["recipe"]: row for row in collect_rows(tmp_path, comparison)}
    assert rows["base"]["successes"] == 60 and rows["base"]["episodes"] == 100  # its own row pools both
    assert rows["late"]["delta"] == pytest.approx(0.4) and rows["late"]["effect"] == "better"
    assert rows["late"]["other_cube_lifted"] == 3 and rows["base"]["other_cube_lifted"] == 0
    write_report(tmp_path)
    assert "| late | all | 40/50 (80%); lifted the other cube in 3 |" in (tmp_path / "recipes.md").read_text()
