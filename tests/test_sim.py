"""Genesis table-top tasks on the CPU backend: expert success, observations, success checks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from vla_dist.rollout.runner import EpisodeRequest, ExpertPolicy, Observation, run_batch
from vla_dist.sim.scene import ACTION_SPACE, STATE_SPACE, TabletopScene
from vla_dist.sim.task_names import TASK_NAMES
from vla_dist.sim.tasks import TASKS, sample_layout

SEEDS_PER_TASK = 10
MIN_SUCCESS = 0.9


@pytest.fixture(scope="module")
def scene() -> Iterator[TabletopScene]:
    # 6 envs: two of each task per batch. Building it also warms the shared kernel cache that the
    # Ray sim actors of later tests load from.
    yield TabletopScene(n_envs=6, image_size=32)


class NullPolicy:
    """Sends zero motion with the gripper open: no task may count this as a success."""

    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None:
        pass

    def act(self, obs: Observation) -> torch.Tensor:
        actions = torch.zeros(obs.proprio.shape[0], ACTION_SPACE["dim"])
        actions[:, 6] = -1.0
        return actions


def test_expert_success_rate_per_task(scene: TabletopScene) -> None:
    results: dict[str, list[bool]] = {task: [] for task in TASK_NAMES[:3]}  # the red cube's (CORE_TASKS)
    index = 0
    while min(len(v) for v in results.values()) < SEEDS_PER_TASK:
        requests = [EpisodeRequest(index + i, TASK_NAMES[(index + i) % 3], 5000 + index + i) for i in range(6)]
        index += 6
        for episode in run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=False):
            results[episode.task].append(episode.success)
    for task, outcomes in results.items():
        rate = float(np.mean(outcomes))
        print(f"expert {task}: {sum(outcomes)}/{len(outcomes)}")
        assert rate >= MIN_SUCCESS, f"{task}: expert succeeded on {sum(outcomes)}/{len(outcomes)} seeds"


def test_null_policy_never_succeeds(scene: TabletopScene) -> None:
    requests = [EpisodeRequest(i, TASK_NAMES[i % 3], 77 + i) for i in range(6)]
    episodes = run_batch(scene, requests, NullPolicy(), fps=10.0, render=False, max_steps=15)
    assert [ep.success for ep in episodes] == [False] * 6
    assert all(ep.num_frames == 15 for ep in episodes)


def test_observations_and_actions_have_declared_shapes(scene: TabletopScene) -> None:
    requests = [EpisodeRequest(i, TASK_NAMES[i % 3], 900 + i) for i in range(4)]  # short batch: padded
    episodes = run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=True)
    assert len(episodes) == 4
    for ep in episodes:
        assert ep.instruction in TASKS[ep.task].instructions
        assert set(ep.frames) == {"front", "wrist"}
        for frames in ep.frames.values():
            assert frames.shape == (ep.num_frames, 32, 32, 3) and frames.dtype == np.uint8
            assert frames.std() > 5, "rendered frames are blank"
        assert ep.state.shape == (ep.num_frames, STATE_SPACE["dim"])
        assert ep.actions.shape == (ep.num_frames, ACTION_SPACE["dim"])
        assert np.isfinite(ep.actions).all() and np.isfinite(ep.state).all()
        # The gripper closes at some point for grasping tasks and is a +-1 command throughout.
        assert set(np.unique(ep.actions[:, 6])) <= {-1.0, 1.0}
    # The front camera sees the scene change as the robot moves.
    front = episodes[0].frames["front"]
    assert np.abs(front[0].astype(int) - front[-1].astype(int)).mean() > 1.0


def test_layouts_are_seeded_and_randomized() -> None:
    a, b, c = (sample_layout("stack_cube", s) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["cube_pos"], c["cube_pos"])
    # The blue cube is placed 12-18 cm from the red one.
    for seed in range(20):
        lay = sample_layout("stack_cube", seed)
        dist = float((lay["cube_pos"][:2] - lay["base_pos"][:2]).norm())
        assert 0.119 < dist < 0.181


def test_dart_noise_is_executed_not_recorded_and_replays_exactly(scene: TabletopScene) -> None:
    """collect.action_noise: the executed translation is perturbed (the trajectory changes), the
    recorded action is the expert's reaction to where the noise took the hand, the noise depends on
    the episode seed alone (any env slot), and replaying the recorded actions with the same noise
    setting retraces the episode exactly (what `vla-dist replay` does with a noisy dataset)."""
    from vla_dist.rollout.policies import PolicySource, ReplayPolicy

    seeds = [9100 + i for i in range(6)]

    def run(noise: float, order: list[int], policy=None) -> dict[int, object]:
        requests = [EpisodeRequest(i, "pick_cube", seeds[i], action_noise=noise) for i in order]
        episodes = run_batch(scene, requests, policy or ExpertPolicy(), fps=10.0, render=False)
        return {ep.seed: ep for ep in episodes}

    clean = run(0.0, list(range(6)))
    noisy = run(0.01, list(range(6)))
    swapped = run(0.01, list(reversed(range(6))))
    for seed in seeds:
        # noise was executed: the hand went elsewhere than in the clean episode
        steps = min(clean[seed].num_frames, noisy[seed].num_frames)
        assert np.abs(noisy[seed].state[:steps] - clean[seed].state[:steps]).max() > 1e-3, seed
        # ... and recorded actions are the expert's own (within its 3 cm translation limit), not action + noise
        assert np.linalg.norm(noisy[seed].actions[:, :3], axis=1).max() <= 0.03 + 1e-6, seed
        # the same seed in another env slot gets the same noise: identical episodes
        np.testing.assert_array_equal(noisy[seed].state, swapped[seed].state)
        np.testing.assert_array_equal(noisy[seed].actions, swapped[seed].actions)
    assert sum(ep.success for ep in noisy.values()) >= 4  # the expert recovers from 1 cm/step noise

    recorded = {seed: ep.actions for seed, ep in noisy.items()}
    replay = ReplayPolicy(PolicySource(kind="replay", recorded=recorded))
    requests = [EpisodeRequest(i, "pick_cube", seeds[i], max_steps=noisy[seeds[i]].num_frames, action_noise=0.01)
                for i in range(6)]
    replayed = {ep.seed: ep for ep in run_batch(scene, requests, replay, fps=10.0, render=False)}
    for seed in seeds:
        np.testing.assert_array_equal(replayed[seed].state, noisy[seed].state)
        assert replayed[seed].success == noisy[seed].success


class DroppingExpert:
    """The scripted expert that lets go of the cube once it has lifted it 5 cm, the kind of error a
    learned policy makes and demonstrations never show. Without following the state its phase
    machine still says "lift", so it keeps lifting an empty hand. Keeps every state it acted on."""

    def __init__(self, follow_state: bool) -> None:
        self.follow_state = follow_state

    def reset(self, task_ids: torch.Tensor, instructions: list[str], seeds: list[int]) -> None:
        from vla_dist.sim.expert import ScriptedExpert

        self.expert = ScriptedExpert(task_ids, follow_state=self.follow_state)
        self.opening = torch.zeros(len(task_ids), dtype=torch.long)  # steps left with the fingers forced open
        self.dropped = torch.zeros(len(task_ids), dtype=torch.bool)
        self.seen: list[dict[str, torch.Tensor]] = []

    def act(self, obs: Observation) -> torch.Tensor:
        self.seen.append({key: value.clone() for key, value in obs.privileged.items()})
        action = self.expert.act(obs.privileged)
        lifted = (obs.privileged["cube_pos"][:, 2] > 0.07) & ~self.dropped
        self.opening[lifted], self.dropped = 4, self.dropped | lifted
        forced = self.opening > 0
        action[forced, :6], action[forced, 6] = 0.0, -1.0
        self.opening[forced] -= 1
        return action


def test_dagger_labels_are_the_state_following_experts_on_the_visited_states(scene: TabletopScene) -> None:
    """run_batch's labeller (DAgger): a policy that drops the cube executes; every recorded action is
    what the state-following expert says on the state reached (recomputed here from the visited
    states), which after the drop is "open, go back down to the cube", not what executed. Driving
    with those labels recovers; the expert that only follows its own history does not."""
    from vla_dist.sim.expert import ScriptedExpert

    requests = [EpisodeRequest(i, "pick_cube", 9300 + i) for i in range(6)]
    dropping = DroppingExpert(follow_state=False)
    labelled = run_batch(scene, requests, dropping, fps=10.0, render=False, labeller=ExpertPolicy(follow_state=True))
    assert dropping.dropped.all() and not any(ep.success for ep in labelled)  # every env dropped it and failed
    relabel = ScriptedExpert(torch.zeros(6, dtype=torch.long), follow_state=True)  # pick_cube: task 0
    expected = torch.stack([relabel.act(state) for state in dropping.seen], dim=1).numpy()
    for i, episode in enumerate(labelled):
        np.testing.assert_allclose(episode.actions, expected[i, : episode.num_frames], atol=1e-6)
    # at the end the dropping policy lifts an empty closed hand; the labels say open and approach
    assert all(episode.actions[-1, 6] < 0 for episode in labelled)
    assert all((episode.actions[-5:, 2] < 0).any() for episode in labelled)  # back down towards the cube

    recovered = run_batch(scene, requests, DroppingExpert(follow_state=True), fps=10.0, render=False)
    assert sum(ep.success for ep in recovered) >= 5, [ep.success for ep in recovered]


def test_state_following_expert_lifts_a_cube_someone_else_grasped() -> None:
    """The expert's phase history can be behind the state: the policy closed the fingers around the
    cube while the expert still thought "approach". Following the state it lifts (closed, up);
    following its history it would open the hand and let go."""
    from vla_dist.sim.expert import TCP_OFFSET, ScriptedExpert

    cube = torch.tensor([[0.5, 0.0, 0.02]])
    state = {"cube_pos": cube, "cube_quat": torch.tensor([[1.0, 0, 0, 0]]),
             "base_pos": torch.tensor([[0.6, 0.1, 0.02]]), "target_pos": torch.tensor([[0.6, -0.1, 0.0]]),
             "hand_pos": cube + torch.tensor([[0.008, 0.0, TCP_OFFSET]]), "hand_quat": torch.tensor([[0.0, 1.0, 0, 0]]),
             "gripper_width": torch.tensor([0.04]), "gripper_closed": torch.tensor([True])}
    task = torch.zeros(1, dtype=torch.long)  # pick_cube
    following = ScriptedExpert(task, follow_state=True).act(state)
    assert following[0, 6] > 0 and following[0, 2] > 0.01  # keep it closed, lift
    history = ScriptedExpert(task, follow_state=False).act(state)
    assert history[0, 6] < 0  # approach: fingers open
    state["gripper_closed"] = torch.tensor([False])  # the fingers opened around the held cube
    lifting = ScriptedExpert(task, follow_state=True)
    lifting.phase[:] = 2  # LIFT
    closing = lifting.act(state)
    assert closing[0, 6] > 0 and torch.linalg.vector_norm(closing[0, :3]) < 1e-6  # close in place first


def _yellow_pixels(images: np.ndarray, mask: bool = False) -> np.ndarray:
    """[N] count of distractor-yellow pixels per image (uint8 [N, H, W, 3]), or (mask) [N, H, W] where
    they are: the table is brown (blue at ~0.8 of green), the red cube has little green; yellow has
    much green and almost no blue."""
    rgb = images.astype(np.int32)
    yellow = (rgb[..., 1] > 60) & (rgb[..., 2] < rgb[..., 1] // 2) & (rgb[..., 0] > rgb[..., 1] // 2)
    return yellow if mask else yellow.sum(axis=(1, 2))


def test_perturbed_appearance_changes_what_the_cameras_see_not_the_physics(scene: TabletopScene) -> None:
    """A moved front camera and a distractor (vla_dist/sim/appearance.py) on the same layouts: the
    front images differ and show the distractor, while every state and action of the expert's
    episodes is the same bit for bit (the distractor has no collision, the camera no body), so a
    policy's success in the perturbed scene is paired layout by layout with the default one. Other
    lights: a second, one-env scene built with them is darker, and the first scene relit with them
    (`set_lighting`, collection's light randomization) renders what it renders."""
    from vla_dist.sim.appearance import Appearance

    requests = [EpisodeRequest(i, TASK_NAMES[i % 3], 9400 + i) for i in range(6)]
    default = run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=True, max_steps=12)
    built = scene.appearance
    scene.appearance = Appearance(camera_offset=(0.0, 0.06, 0.03), camera_jitter=0.01, distractor=True)
    try:
        perturbed = run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=True, max_steps=12)
    finally:
        scene.appearance = built
    again = run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=True, max_steps=12)
    for plain, moved, back in zip(default, perturbed, again, strict=True):
        assert np.array_equal(plain.state, moved.state) and np.array_equal(plain.actions, moved.actions)
        first_plain, first_moved = plain.frames["front"][0].astype(int), moved.frames["front"][0].astype(int)
        not_yellow = _yellow_pixels(first_moved[None], mask=True)[0] == 0
        changed = (np.abs(first_plain - first_moved).max(axis=-1) > 30) & not_yellow
        assert changed.mean() > 0.01, changed.mean()  # robot and cube seen from elsewhere, not just the distractor
        assert np.array_equal(back.frames["front"], plain.frames["front"])  # the camera is put back after
    assert (_yellow_pixels(np.stack([ep.frames["front"][0] for ep in perturbed])) > 0).all()
    assert (_yellow_pixels(np.stack([ep.frames["front"][0] for ep in default])) == 0).all()

    from vla_dist.sim.appearance import Lighting, sample_scene
    from vla_dist.sim.tasks import stack_layouts

    dim = TabletopScene(n_envs=1, image_size=32, appearance=Appearance(light_dir=(1.0, -1.0, -1.0),
                                                                           light_intensity=2.0, ambient_light=0.1))
    dim.reset(stack_layouts([sample_scene("pick_cube", 9400, dim.appearance)]))
    darker = dim.render()
    assert darker["front"][0].astype(int).mean() < default[0].frames["front"][0].astype(int).mean() - 10

    # Lights changed on a built scene (collection's light randomization) render as a scene built with them
    scene.reset(stack_layouts([sample_scene("pick_cube", 9400, built)] * scene.n_envs))
    lit_as_built = scene.render()
    scene.set_lighting(dim.lighting)
    try:
        relit = scene.render()
    finally:
        scene.set_lighting(Lighting(built.light_dir, built.light_intensity, built.ambient_light))
    for camera in ("front", "wrist"):
        assert np.abs(relit[camera][0].astype(int) - darker[camera][0].astype(int)).max() <= 1, camera
        assert np.array_equal(scene.render()[camera], lit_as_built[camera])  # and back, bit for bit


def test_light_randomization_lights_each_batch_by_its_draw_and_records_it(scene: TabletopScene) -> None:
    """collect.light_jitter in run_batch: each batch is lit by `lighting_of(appearance, first seed)`,
    every episode records the lights it was seen under (meta.json "look", through the codec), the
    images change with the draw and nothing else does: states and actions equal the default scene's."""
    from vla_dist.data.codec import decode_sample, encode_episode
    from vla_dist.sim.appearance import Appearance, lighting_of

    built = scene.appearance
    batches = [[EpisodeRequest(i, "pick_cube", first + i) for i in range(scene.n_envs)] for first in (9600, 9700)]
    default = [run_batch(scene, batch, ExpertPolicy(), fps=10.0, render=True, max_steps=3) for batch in batches]
    scene.appearance = Appearance(light_jitter=0.6)
    try:
        relit = [run_batch(scene, batch, ExpertPolicy(), fps=10.0, render=True, max_steps=3) for batch in batches]
    finally:
        scene.appearance = built
    lights = [lighting_of(Appearance(light_jitter=0.6), batch[0].seed) for batch in batches]
    assert lights[0] != lights[1]
    for plain_batch, lit_batch, light in zip(default, relit, lights, strict=True):
        for plain, lit in zip(plain_batch, lit_batch, strict=True):
            assert np.array_equal(plain.state, lit.state) and np.array_equal(plain.actions, lit.actions)
            assert np.abs(plain.frames["front"].astype(int) - lit.frames["front"].astype(int)).mean() > 2
            assert lit.look == {"camera_offset": [0.0, 0.0, 0.0], **light.to_dict()}
            assert plain.look["light_intensity"] == built.light_intensity
    assert decode_sample(encode_episode(relit[1][2], "npz")).look == relit[1][2].look


@pytest.mark.parametrize("space", ["joint_position", "joint_delta"])
def test_joint_scenes_run_the_expert_through_their_ik_and_replay(scene: TabletopScene, space: str) -> None:
    """sim.action_space=joint_position / joint_delta: the expert (end-effector deltas) drives the scene
    through the scene's own inverse kinematics, so the joint scene executes what the end-effector scene
    executes (joint_position: the same states bit for bit; joint_delta: up to the rounding of target -
    joints + joints) while recording 8-dim joint targets or their offsets from the measured joints; the
    joint expert succeeds on >= 90% of each task's layouts; replaying the recorded actions open loop
    retraces the episodes; a policy of the other space is refused."""
    from vla_dist.rollout.policies import PolicySource, ReplayPolicy
    from vla_dist.spaces import ACTION_SPACES

    def run(space: str, start: int) -> list:
        scene.action_space = space
        requests = [EpisodeRequest(start + i, TASK_NAMES[i % 3], 7000 + start + i) for i in range(6)]
        return run_batch(scene, requests, ExpertPolicy(), fps=10.0, render=False)

    try:
        same_ee, same_joint = run("ee_delta_pose", 0), run(space, 0)
        for ee, joint in zip(same_ee, same_joint, strict=True):
            if space == "joint_position":
                np.testing.assert_array_equal(joint.state, ee.state)  # the same physics, bit for bit
                assert joint.success == ee.success
            assert joint.actions.shape == (joint.num_frames, ACTION_SPACES[space]["dim"])
            steps = min(joint.num_frames, ee.num_frames)  # (joint_delta: may end a step apart)
            np.testing.assert_array_equal(joint.actions[:steps, 7], ee.actions[:steps, 6])  # the gripper command
            # the joint targets lead the measured joints by a control step's motion, no more; the
            # delta space records exactly that lead (target - measured joints)
            lead = joint.actions[:, :7] - (0.0 if space == "joint_delta" else joint.state[:, :7])
            # Before the episode's last step: there Genesis' IK, whose solve from the current joints can miss
            # its tolerance as the expert lets go, restarts from sampled joints and may land on another branch
            # (1.8 rad on push's last step with mujoco 4.0.1 on an AMD EPYC; both scenes execute it alike)
            assert np.abs(lead[:-1]).max() < 0.5
            assert np.abs(lead[1:]).mean() > 1e-3  # targets, not the state
        if space == "joint_delta":  # the same motion: each delta is the joint-position scene's target minus
            targets = run("joint_position", 0)  # the joints measured at that step
            for joint, target in zip(same_joint, targets, strict=True):
                steps = min(joint.num_frames, target.num_frames, 20)  # before contacts amplify the rounding
                np.testing.assert_allclose(joint.state[:steps], target.state[:steps], atol=1e-4)
                np.testing.assert_allclose(joint.actions[:steps, :7] + joint.state[:steps, :7],
                                           target.actions[:steps, :7], atol=1e-4)
            scene.action_space = space
        outcomes: dict[str, list[bool]] = {task: [] for task in TASK_NAMES[:3]}
        for start in (0, 6, 12, 18, 24):
            episodes = same_joint if start == 0 else run(space, start)
            for ep in episodes:
                outcomes[ep.task].append(ep.success)
            if start == 0:
                recorded = {ep.seed: ep.actions for ep in episodes}
                replay = ReplayPolicy(PolicySource(kind="replay", recorded=recorded))
                requests = [EpisodeRequest(i, ep.task, ep.seed, max_steps=ep.num_frames)
                            for i, ep in enumerate(episodes)]
                for replayed, original in zip(run_batch(scene, requests, replay, fps=10.0, render=False), episodes,
                                              strict=True):
                    np.testing.assert_array_equal(replayed.state, original.state)
                    assert replayed.success == original.success
        for task, results in outcomes.items():
            print(f"joint-space expert {task}: {sum(results)}/{len(results)}")
            assert np.mean(results) >= MIN_SUCCESS, f"{task}: {sum(results)}/{len(results)}"

        class JointPolicy(NullPolicy):
            action_space = space

        scene.action_space = "ee_delta_pose"
        with pytest.raises(ValueError, match=f"{space} cannot drive a scene taking ee_delta_pose"):
            run_batch(scene, [EpisodeRequest(0, "pick_cube", 1)], JointPolicy(), fps=10.0, render=False, max_steps=2)
    finally:
        scene.action_space = "ee_delta_pose"
