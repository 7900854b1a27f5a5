"""Held-out task combinations: the blue cube as the object of pick and push (vla_dist/sim/tasks.py), and
both cubes on the table (sim.both_cubes), so only the instruction says which cube is meant."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from vla_dist.rollout.runner import EpisodeRequest, ExpertPolicy, Observation, run_batch
from vla_dist.sim.appearance import DISTRACTOR_CLEARANCE, Appearance, sample_scene
from vla_dist.sim.scene import TabletopScene
from vla_dist.sim.tasks import (
    BASE_SIZE,
    CUBE_SIZE,
    LIFT_HEIGHT,
    OTHER_CUBE_CLEARANCE,
    PARKED,
    TASKS,
    sample_layout,
    subject_pos,
    with_other_cube,
)
from vla_dist.spaces import CORE_TASKS, TASK_INSTRUCTIONS, TASK_NAMES

BLUE_TWIN = {"pick_blue_cube": "pick_cube", "push_blue_cube": "push_cube"}


@pytest.mark.parametrize("blue_task", sorted(BLUE_TWIN))
def test_a_blue_cube_task_is_its_red_twin_with_the_blue_cube_in_the_red_ones_place(blue_task: str) -> None:
    red_task = BLUE_TWIN[blue_task]
    for seed in range(50):
        red, blue = sample_layout(red_task, seed), sample_layout(blue_task, seed)
        assert not bool(red["blue_subject"]) and bool(blue["blue_subject"])
        # the task cube stands where the twin's does (on the table at its own half height), the rest alike
        assert torch.equal(blue["base_pos"][:2], red["cube_pos"][:2])
        assert float(blue["base_pos"][2]) == pytest.approx(BASE_SIZE / 2)
        assert torch.equal(subject_pos(blue)[:2], subject_pos(red)[:2])
        assert torch.equal(blue["cube_pos"], torch.tensor(PARKED["cube"]))  # the red cube out of view
        for key in ("target_pos", "arm_noise", "cube_yaw"):
            assert torch.equal(blue[key], red[key]), key
    # The instructions are the twin's word for word with the colour changed, and every word of the
    # held-out combination appears in the other tasks' phrasings (a combination, not a new word)
    for red_text, blue_text in zip(TASK_INSTRUCTIONS[red_task], TASK_INSTRUCTIONS[blue_task], strict=True):
        assert blue_text == red_text.replace("red", "blue")
    others = {word for task in TASK_NAMES if task != blue_task for text in TASK_INSTRUCTIONS[task]
              for word in text.split()}
    assert {word for text in TASK_INSTRUCTIONS[blue_task] for word in text.split()} <= others


@pytest.mark.parametrize("task", ["pick_cube", "push_cube", "pick_blue_cube", "push_blue_cube"])
def test_both_cubes_puts_the_unused_cube_clear_of_the_task_and_moves_nothing_else(task: str) -> None:
    spec = TASKS[task]
    spots = []
    for seed in range(200):
        layout = sample_layout(task, seed)
        both = with_other_cube(task, seed, layout)
        other_key = "cube_pos" if spec.subject == "blue" else "base_pos"
        for key, value in layout.items():  # the task's layout is its one-cube twin's
            if key != other_key:
                assert torch.equal(both[key], value), (seed, key)
        other = both[other_key]
        assert 0.40 <= float(other[0]) <= 0.66 and -0.22 <= float(other[1]) <= 0.22, other  # on the workspace
        assert float(other[2]) == pytest.approx((CUBE_SIZE if spec.subject == "blue" else BASE_SIZE) / 2)
        cube = subject_pos(both)
        assert float((other[:2] - cube[:2]).norm()) >= OTHER_CUBE_CLEARANCE - 1e-6
        if spec.uses_target:  # off the push's path too: its distance to the segment cube -> target
            a, b = cube[:2], both["target_pos"][:2]
            t = float(((other[:2] - a) @ (b - a)) / ((b - a) @ (b - a)))
            closest = a + min(max(t, 0.0), 1.0) * (b - a)
            assert float((other[:2] - closest).norm()) >= OTHER_CUBE_CLEARANCE - 0.011, seed  # spots every 2 cm
        spots.append(other[:2])
        # the distractor keeps clear of both cubes
        drawn = sample_scene(task, seed, Appearance(distractor=True, both_cubes=True))
        assert torch.equal(drawn[other_key], other)
        for placed in (drawn["cube_pos"], drawn["base_pos"]):
            assert float((drawn["distractor_pos"][:2] - placed[:2]).norm()) >= DISTRACTOR_CLEARANCE - 1e-6
    assert torch.stack(spots).std(dim=0).min() > 0.03  # drawn per episode
    # stacking uses both cubes already: nothing to add
    stack = sample_layout("stack_cube", 3)
    assert all(torch.equal(value, stack[key]) for key, value in with_other_cube("stack_cube", 3, stack).items())
    # off (the default): the unused cube parked, as before
    plain = sample_scene(task, 5, Appearance())
    assert torch.equal(plain["cube_pos" if spec.subject == "blue" else "base_pos"],
                       torch.tensor(PARKED["cube" if spec.subject == "blue" else "base"]))


def test_all_still_means_the_red_cubes_three_tasks() -> None:
    from vla_dist.rollout.episodes import selected_tasks

    assert selected_tasks("all") == list(CORE_TASKS) == ["pick_cube", "push_cube", "stack_cube"]
    assert selected_tasks("pick_cube,push_cube,push_blue_cube") == ["pick_cube", "push_cube", "push_blue_cube"]


def test_the_tokenizer_has_every_word_of_every_task_as_one_token() -> None:
    """The corpus is the red cube's tasks (unchanged tokenizers); the blue-cube phrasings must not fall
    apart into pieces no training instruction had."""
    from vla_dist.models.processing import build_tokenizer

    tokenizer = build_tokenizer()
    for task in TASK_NAMES:
        for text in TASK_INSTRUCTIONS[task]:
            for word in text.split():
                assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, (task, word)


@pytest.fixture(scope="module")
def scene() -> Iterator[TabletopScene]:
    yield TabletopScene(n_envs=6, image_size=32, appearance=Appearance(both_cubes=True))


class WrongCubeExpert(ExpertPolicy):
    """The scripted expert shown the other cube as the task's: it picks (or pushes) the cube the
    instruction did not name."""

    def act(self, obs: Observation) -> torch.Tensor:
        state = dict(obs.privileged)
        state["cube_pos"], state["base_pos"] = state["base_pos"], state["cube_pos"]
        state["cube_size"] = torch.where(state["cube_size"] == CUBE_SIZE, BASE_SIZE, CUBE_SIZE)
        return super().act(Observation(obs.images, obs.proprio, state, obs.instructions))


def test_expert_succeeds_on_every_verb_and_cube_with_both_cubes_on_the_table(scene: TabletopScene) -> None:
    """At least 9 of 10 seeds per (verb, cube); the unused cube is a real body beside the task's."""
    tasks = ["pick_cube", "push_cube", "pick_blue_cube", "push_blue_cube"]
    results: dict[str, list[bool]] = {task: [] for task in tasks}
    for start in range(0, 40, 6):
        requests = [EpisodeRequest(i, tasks[i % 4], 6100 + i) for i in range(start, min(start + 6, 40))]
        requests += [EpisodeRequest(100 + i, "pick_cube", 7000 + i) for i in range(6 - len(requests))]
        episodes = run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=False)
        red_z, blue_z = scene.cube.get_pos()[:, 2], scene.base.get_pos()[:, 2]  # the bodies, not the report
        for env, episode in enumerate(episodes):
            if episode.seed < 7000:  # not a filler
                results[episode.task].append(episode.success)
            if episode.task.startswith("pick") and episode.success:  # it still holds the named cube up
                named, other = (blue_z, red_z) if TASKS[episode.task].subject == "blue" else (red_z, blue_z)
                assert named[env] > LIFT_HEIGHT and other[env] < 0.05, (episode.task, named[env], other[env])
    for task, outcomes in results.items():
        print(f"expert {task} (both cubes): {sum(outcomes)}/{len(outcomes)}")
        assert len(outcomes) == 10 and np.mean(outcomes) >= 0.9, (task, outcomes)


def test_lifting_the_cube_the_instruction_did_not_name_is_not_a_success(scene: TabletopScene) -> None:
    """Success is the named cube's: the expert sent to the other cube lifts it, and no episode counts."""
    requests = [EpisodeRequest(i, ["pick_cube", "pick_blue_cube"][i % 2], 6300 + i) for i in range(6)]
    episodes = run_batch(scene, requests, WrongCubeExpert(), fps=10.0, render=False)
    state = scene.object_state()  # after the last step: "base_pos" is each env's other cube
    assert [ep.success for ep in episodes] == [False] * 6
    lifted = state["base_pos"][:, 2] > LIFT_HEIGHT
    assert int(lifted.sum()) >= 5, state["base_pos"]  # the wrong cube did go up
    assert [ep.other_cube_lifted for ep in episodes] == lifted.tolist()  # and each episode says so
    assert not any(ep.other_cube_lifted for ep in run_batch(scene, requests, ExpertPolicy(), fps=10.0,
                                                               render=False))  # the named cube's pick does not
    # and the object position the episodes record is the named cube's, resting on the table
    for episode in episodes:
        named = TASKS[episode.task].subject
        rest = (BASE_SIZE if named == "blue" else CUBE_SIZE) / 2
        assert episode.object_pos is not None
        assert np.abs(episode.object_pos[:, 2] - rest).max() < 0.01, (episode.task, episode.object_pos[-1])
