"""The Genesis table-top scene: a Franka Panda, a red cube, a blue cube and a green target disk.

One `TabletopScene` is one Genesis scene built with `n_envs` parallel environments; every call takes
or returns batched tensors with leading dimension `n_envs`. It takes one of three action spaces
(`vla_dist.spaces.ACTION_SPACES`, sim.action_space): the end-effector delta pose of the hand plus a
gripper command, applied through batched inverse kinematics and joint position control; the joint
position targets themselves plus the gripper command; or those targets as offsets from the measured
joints (joint_delta: the offsets include what holds the arm up against the PD controllers' sag).
Physics runs `decimation` steps per action. `joint_targets` is the first path's inverse kinematics
on its own: the scripted expert, which speaks end-effector deltas, drives a joint scene through it
(`joint_command`) and executes what an end-effector scene would (the same joint targets; in
joint_delta up to the float rounding of target - joints + joints), so every space shares one expert.

Deltas move the hand's *commanded* target pose, not its measured pose (ManiSkill calls this
`pd_ee_target_delta_pose`): joint PD control sags under gravity by about a centimetre, and deltas on
the measured pose would never close that gap, so small corrective moves would stall. The target is
kept within `MAX_TARGET_LEAD` of the measured hand so a blocked arm cannot wind it up.
"""

from __future__ import annotations

import numpy as np
import torch

from vla_dist.sim.appearance import (
    DISTRACTOR_COLOR,
    DISTRACTOR_PARKED,
    DISTRACTOR_SIZE,
    FRONT_CAMERA_LOOKAT,
    FRONT_CAMERA_POS,
    Appearance,
    Lighting,
)
from vla_dist.sim.geometry import axis_angle_to_quat, quat_mul, yaw_quat
from vla_dist.sim.tasks import BASE_SIZE, CUBE_SIZE, PARKED, TARGET_RADIUS, Layout
from vla_dist.spaces import ACTION_SPACE, ACTION_SPACES, CAMERAS, STATE_SPACE  # noqa: F401 (still importable here)

HOME_QPOS = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)
FINGER_OPEN = 0.04  # m per finger
GRASP_FORCE = 2.0  # N per finger, closing
MAX_TARGET_LEAD = 0.05  # m between the commanded hand target and the measured hand
ARM_KP = (4500, 4500, 3500, 3500, 2000, 2000, 2000)
ARM_KV = (450, 450, 350, 350, 200, 200, 200)

_initialized_backend: str | None = None


def init_genesis(backend: str = "cpu") -> None:
    """`gs.init` once per process (Genesis refuses a second init)."""
    global _initialized_backend
    # Genesis imports the stdlib `distutils`; if setuptools comes later (torch.compile's C++ builder
    # imports it through torch.utils.cpp_extension), its distutils shim asserts and every compile in
    # a sim process fails with an InductorError. Importing setuptools first installs the shim before.
    import setuptools  # noqa: F401  (imported for its side effect, see above)

    # isort: split
    import genesis as gs

    if _initialized_backend is None:
        # "error": every actor of every command otherwise repeats the same three warnings about the
        # bundled Franka (tendon approximated by a joint actuator, qpos0 beyond limits, solver timeconst
        # raised to 2*substep dt), all known and harmless for this scene.
        gs.init(backend=gs.cpu if backend == "cpu" else gs.gpu, logging_level="error")
        _initialized_backend = backend
    elif _initialized_backend != backend:
        raise RuntimeError(f"Genesis already initialized with backend {_initialized_backend!r}")


class TabletopScene:
    def __init__(
        self,
        n_envs: int,
        image_size: int = 64,
        cameras: tuple[str, ...] = CAMERAS,
        dt: float = 0.01,
        substeps: int = 2,
        control_hz: int = 10,
        backend: str = "cpu",
        appearance: Appearance | None = None,
        action_space: str = "ee_delta_pose",
    ) -> None:
        if action_space not in ACTION_SPACES:
            raise ValueError(f"action_space {action_space!r}: one of {sorted(ACTION_SPACES)}")
        init_genesis(backend)
        import genesis as gs

        self.n_envs = n_envs
        self.action_space = action_space
        self.appearance = appearance or Appearance()
        look = self.appearance
        self.camera_names = tuple(cameras)
        self.decimation = max(1, round(1.0 / (control_hz * dt)))
        self.scene = gs.Scene(
            sim_options=gs.options.SimOptions(dt=dt, substeps=substeps),
            rigid_options=gs.options.RigidOptions(enable_self_collision=False),
            vis_options=gs.options.VisOptions(
                shadow=False, show_world_frame=False, split_envs=True, ambient_light=(look.ambient_light,) * 3,
                lights=[gs.options.vis.DirectionalLight(dir=look.light_dir, color=(1.0, 1.0, 1.0),
                                                        intensity=look.light_intensity)],
            ),
            show_viewer=False,
        )
        scene = self.scene
        scene.add_entity(gs.morphs.Plane(), surface=gs.surfaces.Default(color=(0.55, 0.45, 0.35)))
        self.robot = scene.add_entity(gs.morphs.MJCF(file="xml/franka_emika_panda/panda.xml"))
        self.cube = scene.add_entity(
            gs.morphs.Box(size=(CUBE_SIZE,) * 3, pos=(0.5, 0.0, CUBE_SIZE / 2)),
            surface=gs.surfaces.Default(color=(0.85, 0.1, 0.1)),
        )
        self.base = scene.add_entity(
            gs.morphs.Box(size=(BASE_SIZE,) * 3, pos=PARKED["base"]),
            surface=gs.surfaces.Default(color=(0.1, 0.25, 0.85)),
        )
        # Visual-only goal marker: fixed, no collision, moved per env at reset.
        self.target = scene.add_entity(
            gs.morphs.Cylinder(radius=TARGET_RADIUS, height=0.002, pos=PARKED["target"], fixed=True, collision=False),
            surface=gs.surfaces.Default(color=(0.1, 0.75, 0.2)),
        )
        # Visual-only too, and always present (parked unless sim.distractor): one scene structure keeps
        # Genesis' compiled kernels the same for the default and the perturbed scenes.
        self.distractor = scene.add_entity(
            gs.morphs.Box(size=(DISTRACTOR_SIZE,) * 3, pos=DISTRACTOR_PARKED, fixed=True, collision=False),
            surface=gs.surfaces.Default(color=DISTRACTOR_COLOR),
        )
        self.cameras = {}
        if "front" in self.camera_names:
            self.cameras["front"] = scene.add_camera(
                res=(image_size, image_size), pos=FRONT_CAMERA_POS, lookat=FRONT_CAMERA_LOOKAT, fov=45, GUI=False
            )
        if "wrist" in self.camera_names:
            self.cameras["wrist"] = scene.add_camera(
                res=(image_size, image_size), pos=(0.5, 0.0, 0.5), lookat=(0.5, 0.0, 0.0), fov=75, near=0.01, GUI=False
            )
        scene.build(n_envs=n_envs)

        self.hand = self.robot.get_link("hand")
        self.arm_dofs = np.arange(7)
        self.finger_dofs = np.arange(7, 9)
        self.robot.set_dofs_kp(np.array([*ARM_KP, 100, 100]))
        self.robot.set_dofs_kv(np.array([*ARM_KV, 10, 10]))
        self.robot.set_dofs_force_range(
            np.array([-87, -87, -87, -87, -12, -12, -12, -100, -100]),
            np.array([87, 87, 87, 87, 12, 12, 12, 100, 100]),
        )
        if "wrist" in self.cameras:
            self.cameras["wrist"].attach(self.hand, _wrist_camera_offset())
        self._gripper_closed = torch.zeros(n_envs, dtype=torch.bool)
        self._blue_subject = torch.zeros(n_envs, dtype=torch.bool)  # per env, set by reset
        self._camera_moved = False
        self._lighting = Lighting(look.light_dir, look.light_intensity, look.ambient_light)  # as built
        if "front" in self.cameras:
            self._front_built = np.array(self.cameras["front"].transform, dtype=np.float64, copy=True)

    # ----------------------------------------------------------------------------------------------
    def reset(self, layout: Layout) -> None:
        """Place every env's objects and robot as `layout` says (all envs at once)."""
        qpos = torch.tensor(HOME_QPOS).repeat(self.n_envs, 1) + layout.arm_noise
        fingers = torch.full((self.n_envs, 2), FINGER_OPEN)
        full = torch.cat((qpos, fingers), dim=1)
        self.robot.set_dofs_position(full, zero_velocity=True)
        self.robot.control_dofs_position(full)
        self._target_pos = self.hand.get_pos().clone()
        self._target_quat = self.hand.get_quat().clone()
        self.cube.set_pos(layout.cube_pos, zero_velocity=True)
        self.cube.set_quat(yaw_quat(layout.cube_yaw), zero_velocity=True)
        self.base.set_pos(layout.base_pos, zero_velocity=True)
        self.base.set_quat(yaw_quat(torch.zeros(self.n_envs)), zero_velocity=True)
        self.target.set_pos(layout.target_pos)
        self._gripper_closed.zero_()
        blue = layout.blue_subject
        self._blue_subject = torch.zeros(self.n_envs, dtype=torch.bool) if blue is None else blue.to(torch.bool)
        self._place_look(layout)

    def _place_look(self, layout: Layout) -> None:
        """Per-episode appearance (vla_dist/sim/appearance.py): each env's front camera position and
        the distractor's place; a layout without them gets the default scene."""
        parked = torch.tensor(DISTRACTOR_PARKED).repeat(self.n_envs, 1)
        self.distractor.set_pos(parked if layout.distractor_pos is None else layout.distractor_pos)
        front = self.cameras.get("front")
        offset = layout.camera_offset
        moves = offset is not None and bool(offset.abs().max() > 0)
        if front is None or not (moves or self._camera_moved):
            return  # the camera stands where it was built: leave it bit for bit
        envs = np.arange(self.n_envs)
        if moves:
            pos = (torch.tensor(FRONT_CAMERA_POS) + offset).numpy()
            lookat = np.tile(FRONT_CAMERA_LOOKAT, (self.n_envs, 1))
            front.set_pose(pos=pos, lookat=lookat, up=np.tile((0.0, 0.0, 1.0), (self.n_envs, 1)), envs_idx=envs)
        else:  # back to the pose it was built with, exactly (a recomputed pose differs in the last bits)
            front.set_pose(transform=self._front_built, envs_idx=envs)
        self._camera_moved = moves

    @property
    def lighting(self) -> Lighting:
        return self._lighting

    def set_lighting(self, lighting: Lighting) -> None:
        """Light every env as `lighting` says from the next render on (collection's light randomization,
        vla_dist/sim/appearance.py). Genesis sets lights when a scene is built; this changes the built
        light in place (its pyrender node, as Genesis' own `add_light` poses it) and the ambient level,
        so the images equal those of a scene built with these lights (tests/test_sim.py). The same lights
        again are left alone, bit for bit."""
        if lighting == self._lighting:
            return
        import genesis.utils.geom as gu

        renderer_scene = self.scene.visualizer.context._scene  # Genesis' pyrender scene
        (node,) = renderer_scene.directional_light_nodes  # the one light the constructor adds
        pose = np.eye(4, dtype=np.float32)
        gu.z_up_to_R(-np.array(lighting.light_dir, dtype=np.float32), out=pose[:3, :3])
        node.light.intensity = lighting.light_intensity
        renderer_scene.ambient_light = np.array((lighting.ambient_light,) * 3)
        renderer_scene.set_pose(node, pose)  # advances the scene's revision: the renderer re-reads its lights
        self._lighting = lighting

    def joint_targets(self, ee_actions: torch.Tensor) -> torch.Tensor:
        """End-effector delta actions [B, 7] -> joint-position actions [B, 8]: moves the commanded hand
        target by the deltas (kept within MAX_TARGET_LEAD of the measured hand) and returns the arm's
        inverse kinematics for it, with the gripper command. Call once per control step, before `step`."""
        actions = ee_actions.to(torch.float32)
        hand_pos = self.hand.get_pos()
        lead = self._target_pos + actions[:, :3] - hand_pos
        lead = lead * torch.clamp(MAX_TARGET_LEAD / lead.norm(dim=-1, keepdim=True).clamp_min(1e-9), max=1.0)
        self._target_pos = hand_pos + lead
        self._target_quat = quat_mul(axis_angle_to_quat(actions[:, 3:6]), self._target_quat)
        qpos = self.robot.inverse_kinematics(
            link=self.hand, pos=self._target_pos, quat=self._target_quat, dofs_idx_local=self.arm_dofs
        )
        return torch.cat((qpos[:, :7].to(torch.float32), actions[:, 6:7]), dim=1)

    def joint_command(self, ee_actions: torch.Tensor) -> torch.Tensor:
        """End-effector delta actions [B, 7] as this joint scene's actions [B, 8]: `joint_targets`
        (joint_position), or those targets' offsets from the measured joints (joint_delta), which `step`
        adds back. Call once per control step, before `step`."""
        targets = self.joint_targets(ee_actions)
        if self.action_space == "joint_delta":
            targets[:, :7] -= self._arm_positions()
        return targets

    def _arm_positions(self) -> torch.Tensor:
        return self.robot.get_dofs_position(self.arm_dofs).to(torch.float32)

    def step(self, actions: torch.Tensor) -> None:
        """Apply one control action per env ([B, 7] or [B, 8], as `action_space` says) and advance
        physics `decimation` steps."""
        actions = actions.to(torch.float32)
        if self.action_space == "ee_delta_pose":
            actions = self.joint_targets(actions)
        elif self.action_space == "joint_delta":
            actions = torch.cat((self._arm_positions() + actions[:, :7], actions[:, 7:]), dim=1)
        self.robot.control_dofs_position(actions[:, :7], self.arm_dofs)
        close = actions[:, 7] > 0
        self._gripper_closed = close
        # Closing is force-controlled so the fingers squeeze whatever they hold; opening is positional.
        force = torch.where(close, -GRASP_FORCE, 0.0)[:, None].repeat(1, 2)
        opened = torch.full((self.n_envs, 2), FINGER_OPEN)
        if bool(close.any()):
            idx = torch.nonzero(close).flatten()
            self.robot.control_dofs_force(force[idx], self.finger_dofs, envs_idx=idx)
        if bool((~close).any()):
            idx = torch.nonzero(~close).flatten()
            self.robot.control_dofs_position(opened[idx], self.finger_dofs, envs_idx=idx)
        for _ in range(self.decimation):
            self.scene.step()

    # ----------------------------------------------------------------------------------------------
    def proprio(self) -> torch.Tensor:
        """Robot state [B, 15] as described by STATE_SPACE."""
        q = self.robot.get_dofs_position()
        width = q[:, 7:9].sum(dim=1, keepdim=True)
        return torch.cat((q[:, :7], width, self.hand.get_pos(), self.hand.get_quat()), dim=1).to(torch.float32)

    def render(self) -> dict[str, np.ndarray]:
        """One RGB image per env and camera: {camera: uint8 [B, H, W, 3]}."""
        images = {}
        for name, camera in self.cameras.items():
            if name == "wrist":
                camera.move_to_attach()
            rgb = camera.render(rgb=True)[0]
            rgb = np.asarray(rgb, dtype=np.uint8)
            images[name] = rgb.reshape(self.n_envs, *rgb.shape[-3:])
        return images

    def object_state(self) -> dict[str, torch.Tensor]:
        """Simulator state for success checks, the scripted expert and rewards. `cube_*` is each env's
        task cube (the red one, or the blue one for a blue-cube task: `Layout.blue_subject`) and
        `base_pos` the other cube, so every consumer is written once for "the task's cube";
        `cube_size` is its edge (m)."""
        red_pos, red_quat = self.cube.get_pos(), self.cube.get_quat()
        blue_pos, blue_quat = self.base.get_pos(), self.base.get_quat()
        blue = self._blue_subject[:, None]
        return {
            "cube_pos": torch.where(blue, blue_pos, red_pos),
            "cube_quat": torch.where(blue, blue_quat, red_quat),
            "cube_size": torch.where(self._blue_subject, BASE_SIZE, CUBE_SIZE).to(red_pos.dtype),
            "base_pos": torch.where(blue, red_pos, blue_pos),
            "target_pos": self.target.get_pos(),
            "hand_pos": self.hand.get_pos(),
            "hand_quat": self.hand.get_quat(),
            "gripper_width": self.robot.get_dofs_position()[:, 7:9].sum(dim=1),
            "gripper_closed": self._gripper_closed.clone(),
        }


def _wrist_camera_offset() -> np.ndarray:
    """Camera pose in the hand frame: mounted beside the hand, looking past the fingertips.

    A camera looks along its own -z; the hand's +z points out between the fingers (10 cm to the
    fingertips). Seen from 9 cm to the side, the view axis passes just beyond the fingertips, so the
    fingers and whatever they hold stay in view while the table below is visible.
    """
    eye = np.array([0.09, 0.0, -0.02])
    view = np.array([0.0, 0.0, 0.14]) - eye
    z_axis = -view / np.linalg.norm(view)
    x_axis = np.cross(np.array([0.0, 1.0, 0.0]), z_axis)
    x_axis /= np.linalg.norm(x_axis)
    y_axis = np.cross(z_axis, x_axis)
    offset = np.eye(4)
    offset[:3, :3] = np.stack((x_axis, y_axis, z_axis), axis=1)
    offset[:3, 3] = eye
    return offset

