"""Which task and seed episode i of a run gets: shared by collection, evaluation and training-time evals.

Episode i runs tasks[i % len(tasks)]. Its seed (the layout, the instruction paraphrase, a policy's
noise) comes from (run.seed, i) and a stream: collection uses stream 0, held-out evaluation stream 1,
so the same run.seed gives evaluation layouts no demonstration had.
"""

from __future__ import annotations

import numpy as np

from vla_dist.spaces import CORE_TASKS

EVAL_SEED_STREAM = 1  # collection uses stream 0 (episode_seed)


def selected_tasks(name: str) -> list[str]:
    """task.name -> the tasks a run spreads its episodes over: "all" (the red cube's three tasks,
    spaces.CORE_TASKS), one task, or several separated by commas ("push_cube,stack_cube": the transfer
    recipes' two tasks), in that order."""
    return list(CORE_TASKS) if name == "all" else [part.strip() for part in name.split(",")]


def episode_seed(run_seed: int, index: int) -> int:
    """Independent, reproducible seed per episode (not run_seed + index, which would overlap runs)."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1)[0])


def eval_seed(run_seed: int, index: int) -> int:
    """Held-out episode seed: episode_seed's scheme on another stream."""
    return int(np.random.SeedSequence([run_seed, index, EVAL_SEED_STREAM]).generate_state(1)[0])


RL_SEED_STREAM = 2  # RL training rollouts: layouts apart from collection's (0) and held-out evaluation's (1)


def rl_seed(run_seed: int, iteration: int, index: int) -> int:
    """Layout seed of RL rollout group `index` of `iteration`."""
    return int(np.random.SeedSequence([run_seed, iteration, index, RL_SEED_STREAM]).generate_state(1)[0])


def practice_seed(run_seed: int, j: int) -> int:
    """Layout seed of layout j of RL's practice pool (rl.layouts): the layout fresh RL rollouts would give
    group j of the first iteration (iteration 0), so the pool is a run's first layouts, kept."""
    return rl_seed(run_seed, 0, j)


def practice_layout(run_seed: int, iteration: int, group: int, groups: int, layouts: int) -> tuple[int, int]:
    """(pool index j, layout seed) of RL rollout group `group` of `iteration` (from 0, as the RL loop
    counts; `groups` per iteration) when rl.layouts = `layouts` > 0: the pool's layouts taken in order,
    continuing across iterations, so every layout is practised equally often."""
    j = (iteration * groups + group) % layouts
    return j, practice_seed(run_seed, j)


DAGGER_SEED_STREAM = 3  # DAgger's rollouts (vla_dist/dagger.py): apart from demonstrations, held-out evals and RL


def dagger_seed(run_seed: int, round_number: int, index: int) -> int:
    """Layout seed of episode `index` of DAgger round `round_number`."""
    return int(np.random.SeedSequence([run_seed, round_number, index, DAGGER_SEED_STREAM]).generate_state(1)[0])


DRAW_SEED_STREAM = 4  # repeated plays of one layout (EpisodeRequest.draw): a policy noise seed per play


def draw_seed(layout_seed: int, draw: int) -> int:
    """The policy noise seed of play `draw` of a layout: the layout seed itself on play 0 (so single plays
    are as before), an independent one on each later play."""
    if draw == 0:
        return layout_seed
    return int(np.random.SeedSequence([layout_seed, draw, DRAW_SEED_STREAM]).generate_state(1)[0])
