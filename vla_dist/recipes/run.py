"""`vla-dist recipes run NAME...`: each recipe and the baseline, on the same seeds, data budget and layouts.

A recipe is a config file, `configs/recipe/<NAME>.yaml` (or a path), composed like any other (its
`defaults` usually name the baseline and change a few keys: the survey family it belongs to and why
are in its header and in docs/recipes.md). For every seed in `recipes.seeds` each recipe runs as the
commands a user would type, each a stage with its own run.dir (vla_dist/stages.py):

    RECIPES_DIR/NAME/collect                  vla-dist collect   (once per recipe; a data.dir that
                                                                  already holds the episodes is reused)
    RECIPES_DIR/NAME/seed_S/train | rl | dagger
                                              vla-dist train     (recipes.command=train: SFT)
                                              vla-dist rl        (recipes.command=rl: from the policy of
                                                                  recipes.start_from at the same seed)
                                              vla-dist dagger    (recipes.command=dagger: likewise)
    RECIPES_DIR/NAME/seed_S/select            vla-dist select    (a recipe with select.pool, instead of
                                                                  collect: active data selection into
                                                                  seed_S/data, by the policy of
                                                                  recipes.start_from, whose data it
                                                                  excludes and keeps; trains from scratch)
    RECIPES_DIR/NAME/seed_S/eval-VARIANT      vla-dist eval      (per recipes.evals variant, held out)

The seed is `run.seed` of the train, rl and eval stages: initialization, data order, augmentation
draws and the held-out layouts, which are therefore the same for every recipe at one seed (a paired
comparison). Collection keeps the recipe's own run.seed, so a dataset does not depend on which seed
ran first. A stage whose report says it finished is kept, a stopped one resumes: re-running the same
command continues an interrupted comparison, and adding a recipe later runs only that recipe. A stage
that runs again (a larger train.steps resumes it; a dataset collected anew) first moves what later
stages made from its earlier output to PATH.stale (`stages.dependents`): their evaluations, the policies
started from it, and so on, which then run again.

Fairness is checked before anything runs: every SFT recipe trains the baseline's number of samples
(train.steps x global batch) and collects at most its number of episodes, or the plan fails naming
the key; a recipe continuing another's policy (RL, DAgger, more SFT) reports its extra budget (its
rollouts and samples) beside its result.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from vla_dist import atomic
from vla_dist.config import ConfigError, load_config, validate
from vla_dist.config.load import find_config_file
from vla_dist.config.schema import RunConfig
from vla_dist.locks import holding
from vla_dist.stages import dependents, run_stage, set_aside_later

Log = Callable[[str], None]
RECIPE_DIR = Path("configs/recipe")
COMPARISON = "comparison.json"  # RECIPES_DIR/comparison.json: the baseline, the recipes and their files


def recipe_file(name: str) -> Path:
    """NAME -> configs/recipe/NAME.yaml (from the cwd or the checkout); a path ending in .yaml as given."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPE_DIR / f"{name}.yaml"
    try:
        return find_config_file(path)
    except ConfigError:
        known = sorted(p.stem for p in find_config_file(RECIPE_DIR / "sft-pick.yaml").parent.glob("*.yaml"))
        raise ConfigError(None, f"no recipe {name!r}: {path} not found; recipes: {', '.join(known)}") from None


def recipe_name(name: str) -> str:
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


@dataclass(frozen=True)
class RecipeStage:
    recipe: str
    seed: int | None  # None: the recipe's collect stage (seed-independent)
    name: str  # its directory: RECIPES_DIR/recipe/[seed_S/]name
    command: str  # collect | train | rl | eval
    overrides: tuple[str, ...]  # after the user's: what makes this stage what it is (run.dir last)
    made_earlier: tuple[str, ...] = ()  # keys naming an earlier stage's output: null when checked up front


def plan(recipes: dict[str, RunConfig], base: RunConfig) -> list[RecipeStage]:
    """Every stage of the comparison in order: per seed, each recipe in `recipes`' order (`ordered`:
    the baseline first, every recipe after the one it starts from). `base` is the baseline's config
    (recipes.* of the comparison)."""
    root = Path(base.recipes.dir)
    evals = list(base.recipes.evals)
    stages: list[RecipeStage] = []
    for name, cfg in recipes.items():
        if cfg.recipes.command == "train" and not selects(cfg):
            stages.append(RecipeStage(name, None, "collect", "collect", (f"run.dir={root / name / 'collect'}",)))
    for seed in base.recipes.seeds:
        for name, cfg in recipes.items():
            here = root / name / f"seed_{seed}"
            seeded = (f"run.seed={seed}",)
            start = recipe_name(cfg.recipes.start_from) if cfg.recipes.start_from else None
            start_policy = policy_dir(root, start, seed, evals[0], recipes[start].recipes.command) if start else None
            pretrained = (f"model.pretrained={start_policy}",) if start else ()
            data: tuple[str, ...] = ()
            if selects(cfg):  # its own choice of episodes per seed; the start's policy scores, it trains anew
                data, pretrained = (f"data.dir={here / 'data'}",), ()
                stages.append(_select_stage(name, seed, cfg, root, start, start_policy, recipes, (*seeded, *data)))
            command = cfg.recipes.command
            stages.append(RecipeStage(name, seed, command, command,
                                      (*seeded, *pretrained, *data, f"run.dir={here / command}"),
                                      ("model.pretrained",) if pretrained else ()))
            for variant in evals:
                # the first evaluation exports the run's latest checkpoint (train or rl) to its policy/,
                # which the other evaluations and any recipe starting from this one read (dagger saves its own)
                exports = variant == evals[0] and command != "dagger"
                checkpoint = here / command if exports else policy_dir(root, name, seed, evals[0], command)
                stages.append(RecipeStage(name, seed, f"eval-{variant}", "eval", (
                    *seeded, "eval.policy=model", f"eval.checkpoint={checkpoint}",
                    *base.recipes.evals[variant], f"run.dir={here / f'eval-{variant}'}"), ("eval.checkpoint",)))
    return stages


def selects(cfg: RunConfig) -> bool:
    """An SFT recipe whose data is chosen from select.pool (`vla-dist select`) instead of collected."""
    return cfg.recipes.command == "train" and cfg.select.pool is not None


def _select_stage(name: str, seed: int, cfg: RunConfig, root: Path, start: str | None, start_policy: Path | None,
                  recipes: dict[str, RunConfig], common: tuple[str, ...]) -> RecipeStage:
    """The selection of a recipe's seed: the policy it starts from scores the pool, and the data that
    policy trained on is excluded from the choice and kept ahead of it (the active-learning loop)."""
    overrides, made_earlier = list(common), []
    if start is not None:
        start_cfg = recipes[start]
        start_data = root / start / f"seed_{seed}" / "data" if selects(start_cfg) else Path(start_cfg.data.dir)
        overrides += [f"select.exclude=[{start_data}]", f"select.keep=[{start_data}]"]
        if cfg.select.score != "random":
            overrides.append(f"eval.checkpoint={start_policy}")
            made_earlier.append("eval.checkpoint")
    elif cfg.select.score != "random":
        raise ConfigError("recipes.start_from", f"recipe {name!r} scores episodes by a policy "
                          f"(select.score={cfg.select.score}): name the recipe whose policy scores them")
    overrides.append(f"run.dir={root / name / f'seed_{seed}' / 'select'}")
    return RecipeStage(name, seed, "select", "select", tuple(overrides), tuple(made_earlier))


def policy_dir(root: Path, name: str, seed: int, first_eval: str, command: str = "train") -> Path:
    """The saved policy a recipe's seed produced: what its first evaluation exported (dagger: its own)."""
    if command == "dagger":
        return root / name / f"seed_{seed}" / "dagger" / "policy"
    return root / name / f"seed_{seed}" / f"eval-{first_eval}" / "policy"


def ordered(names: Sequence[str], baseline: str, overrides: Sequence[str],
            composed: dict[str, RunConfig] | None = None) -> dict[str, RunConfig]:
    """name -> the recipe's config in its up-front form (`up_front_config`), the baseline first and every
    recipe after the one it starts from; a recipe named twice runs once. `composed`: configs composed
    earlier in this run (by `baseline_name`), reused rather than composed again."""
    wanted = [recipe_name(baseline)] + [recipe_name(n) for n in names if recipe_name(n) != recipe_name(baseline)]
    files = {recipe_name(n): n for n in [baseline, *names]}
    composed = {} if composed is None else composed
    configs = {name: up_front_config(files[name], overrides, composed) for name in dict.fromkeys(wanted)}
    result: dict[str, RunConfig] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in result:
            return
        if name in chain:
            cycle = " -> ".join((*chain, name))
            raise ConfigError("recipes.start_from", f"recipes start from each other in a cycle: {cycle}")
        start = configs[name].recipes.start_from
        if start:
            if recipe_name(start) not in configs:
                raise ConfigError("recipes.start_from", f"recipe {name!r} starts from {start!r}: name it in the "
                                  "same `vla-dist recipes run` (or make it the baseline)")
            visit(recipe_name(start), (*chain, name))
        result[name] = configs[name]

    for name, cfg in configs.items():
        visit(name, ())
        control = cfg.recipes.control
        if control:
            try:
                recipe_file(control)
            except ConfigError as error:
                raise ConfigError("recipes.control", f"recipe {name!r}: {error.problem}") from None
    return result


def _recipe_config(name: str, overrides: Sequence[str], made_earlier: Sequence[str] = ()) -> RunConfig:
    return validate(load_config(recipe_file(name), [*overrides, *(f"{key}=null" for key in made_earlier)]))


def up_front_config(name: str, overrides: Sequence[str], composed: dict[str, RunConfig]) -> RunConfig:
    """The recipe's config as checked before any stage runs: model.pretrained nulled (it may name a policy
    an earlier stage makes; each stage loads its own config when it runs). Kept in `composed` by name, so
    one `recipes run` composes each recipe's files once."""
    if recipe_name(name) not in composed:
        composed[recipe_name(name)] = _recipe_config(name, overrides, made_earlier=("model.pretrained",))
    return composed[recipe_name(name)]


def check_budgets(recipes: dict[str, RunConfig], baseline: str) -> None:
    """Same data and compute as the baseline for every SFT recipe, else fail naming the key. A recipe
    that continues another's policy (recipes.start_from: rl, dagger, more SFT) spends a budget on top of
    that one's, which the report shows beside its result."""
    base = recipes[baseline]
    for name, cfg in recipes.items():
        if cfg.recipes.command != "train" or name == baseline or (cfg.recipes.start_from and not selects(cfg)):
            continue  # (a selecting recipe trains anew on its choice: the baseline's budget applies)
        if samples_trained(cfg) != samples_trained(base):
            raise ConfigError("train.steps", f"recipe {name!r} trains {samples_trained(cfg):,} samples (train.steps x "
                              f"global batch), the baseline {baseline!r} {samples_trained(base):,}: a comparison "
                              "needs the same budget")
        if cfg.collect.episodes > base.collect.episodes:
            raise ConfigError("collect.episodes", f"recipe {name!r} collects {cfg.collect.episodes} demonstrations, "
                              f"more than the baseline's {base.collect.episodes}")


def samples_trained(cfg: RunConfig) -> int:
    t = cfg.train
    return t.steps * t.micro_batch_size * t.grad_accum * t.world_size


def run_recipes(names: Sequence[str], overrides: Sequence[str], log: Log = print) -> dict[str, Any]:
    """Run the plan (every config checked first), then write the report."""
    composed: dict[str, RunConfig] = {}
    base = _recipe_config(baseline_name(overrides, names, composed), overrides)
    root = Path(base.recipes.dir)
    recipes = ordered(names, base.recipes.baseline, overrides, composed)
    check_budgets(recipes, recipe_name(base.recipes.baseline))
    stages = plan(recipes, base)
    files = {recipe_name(n): n for n in [base.recipes.baseline, *names]}
    # every stage's config fails here, before any stage runs
    configs = [stage_config(files[stage.recipe], stage, overrides, up_front=True) for stage in stages]
    after = dependents(stages, configs)
    record_comparison(root, base, {name: (files[name], cfg) for name, cfg in recipes.items()}, overrides)
    started = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        line = shlex.join(["vla-dist", stage.command, "--config", str(recipe_file(files[stage.recipe])),
                           *overrides, *stage.overrides])
        log(f"[{number}/{len(stages)}] {stage.recipe} seed {stage.seed if stage.seed is not None else '-'} "
            f"{stage.name}: {line}")
        # when it runs (or resumes to a larger budget), what was made from its earlier output is set
        # aside first: a kill from then on leaves no result of the old output looking current
        run_stage(stage.command, stage_config(files[stage.recipe], stage, overrides), log,
                  before_run=partial(set_aside_later, stages, configs, after[number - 1], log))
    from vla_dist.recipes.report import write_report
    from vla_dist.runtime import stop_command_ray

    stop_command_ray()
    report = write_report(root)
    return {"command": "recipes run", "recipes": len(recipes), "seeds": len(base.recipes.seeds),
            "stages": len(stages), "wall_s": round(time.perf_counter() - started, 1), **report}


def baseline_name(overrides: Sequence[str], names: Sequence[str] = (),
                  composed: dict[str, RunConfig] | None = None) -> str:
    """The comparison's baseline (it names the baseline's file): recipes.baseline from the command line,
    else the one the named recipes' files declare (all the same one), else the schema's default.
    `composed` keeps the configs composed to read it, for `ordered`."""
    for override in reversed(overrides):
        key, _, value = override.partition("=")
        if key.strip() == "recipes.baseline":
            return value.strip()
    composed = {} if composed is None else composed
    declared = {name: up_front_config(name, overrides, composed).recipes.baseline for name in names}
    if len(set(declared.values())) > 1:
        each = ", ".join(f"{recipe_name(name)} -> {baseline}" for name, baseline in declared.items())
        raise ConfigError("recipes.baseline", f"the recipes are compared with different baselines ({each}): run "
                          "each baseline's recipes in a comparison of their own, or give recipes.baseline=NAME")
    return next(iter(declared.values()), RunConfig().recipes.baseline)


def stage_config(file: str, stage: RecipeStage, overrides: Sequence[str], up_front: bool = False) -> RunConfig:
    """The stage's config; `up_front` (checked before any stage ran): the keys naming an earlier stage's
    output nulled, since validation looks for what they name."""
    extra = [f"{key}=null" for key in stage.made_earlier] if up_front else []
    return validate(load_config(recipe_file(file), [*overrides, *stage.overrides, *extra]))


def record_comparison(root: Path, base: RunConfig, files: dict[str, tuple[str, RunConfig]],
                       overrides: Sequence[str]) -> None:
    """RECIPES_DIR/comparison.json: what the report compares. A later run adding recipes, seeds or evaluation
    variants extends it."""
    path = root / COMPARISON
    with holding([path]):  # two runs started at once into one recipes.dir: neither loses the other's recipes
        _extend_comparison(path, base, files, overrides)


def _extend_comparison(path: Path, base: RunConfig, files: dict[str, tuple[str, RunConfig]],
                       overrides: Sequence[str]) -> None:
    earlier = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    recipes = {**earlier.get("recipes", {}), **{
        name: {"file": str(recipe_file(file)), "command": cfg.recipes.command, "start_from": cfg.recipes.start_from,
               "control": recipe_name(cfg.recipes.control) if cfg.recipes.control else None}
        for name, (file, cfg) in files.items()}}
    if earlier and earlier.get("baseline") != recipe_name(base.recipes.baseline):
        raise ConfigError("recipes.baseline", f"{path.parent} compares against {earlier.get('baseline')!r}: use "
                          f"another recipes.dir for a comparison against {base.recipes.baseline!r}")
    seeds = sorted({*earlier.get("seeds", []), *base.recipes.seeds})
    # a later run with fewer evaluation variants (e.g. an RL recipe scored on the default scene only)
    # must not drop the rows of the variants earlier runs evaluated
    evals = list(dict.fromkeys([*earlier.get("evals", []), *base.recipes.evals]))
    record = {"baseline": recipe_name(base.recipes.baseline), "seeds": seeds,
              "evals": evals, "recipes": recipes, "overrides": list(overrides)}
    atomic.write_text(path, json.dumps(record, indent=2) + "\n")
