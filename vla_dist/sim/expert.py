"""Scripted experts: closed-loop waypoint controllers on privileged simulator state.

One `ScriptedExpert` drives a whole batch; each env runs its own task's phase machine. Targets are
recomputed from the objects' current poses every step (closed loop), so a cube that slips or turns is
followed rather than missed. Output is the scene's action space: hand delta pose + gripper command.

The grasp is written to be imitated, not only to succeed. A policy learns it from camera images, so
every decision in it must be visible and forgiving:
- No yaw alignment before a grasp: the open gripper (8 cm) takes the 4 cm cube at any yaw (its
  diagonal is 5.7 cm) and closing squares the cube up. Aligning first made every demonstration
  wait for a 3-degree match of the hand to the cube's yaw, which a small policy cannot see at 64 px;
  its imitations hovered above the cube forever (closest approach ~10 cm = HOVER, 0% success).
  Expert success is the same without it (pick and stack 24/24 either way, measured).
- A funnel instead of hover-then-descend: the hand's height above the cube shrinks with its
  horizontal distance to it (FUNNEL), so the descent is a smooth function of what the cameras show,
  with no hidden "aligned within 1 cm, now descend" switch for a policy to guess.
- Push uses the same funnel, onto the point behind the cube (seen from the target), turning to the
  push direction on the way. Its earlier hover-then-descend waited above that point for a 1 cm and
  3-degree match; imitations hovered there until the episode limit (push 2/30, closest 4.6 cm).

Labelling another policy's states (DAgger, `follow_state=True`): the phase machine is driven by that
policy's actions, not the expert's, so its history can be wrong about the scene. Before each label
the phase is corrected from the state (`_follow`): a cube the policy grasped is lifted rather than let
go of, fingers the policy opened on a held cube close first, and a grasp the policy lost is
approached again. The expert's own runs never meet these states (`follow_state=False` keeps its
collected demonstrations exactly as before).
"""

from __future__ import annotations

import math

import torch

from vla_dist.sim.geometry import (
    quat_conj,
    quat_mul,
    quat_to_axis_angle,
    quat_yaw,
    top_down_quat,
    wrap_angle,
)
from vla_dist.sim.tasks import BASE_SIZE, CUBE_SIZE, VERB_OF_TASK, VERBS

TCP_OFFSET = 0.105  # m from the hand link origin to the point between the finger pads, along hand z
MAX_STEP = 0.03  # m of hand translation per control step
PUSH_STEP = 0.012  # m per step while pushing: slow enough that the cube does not slide past the target
MAX_TURN = 0.2  # rad of hand rotation per control step
GAIN = 0.9  # fraction of the remaining error commanded per step (PD tracking lags a little)
HOVER = 0.10  # m above the cube while still far from it horizontally
FUNNEL = 3.0  # approach height above the cube per m of horizontal distance to it (capped at HOVER)
FUNNEL_SLACK = 0.005  # m of horizontal distance at which the hand goes all the way down
CLOSE_STEPS = 4  # control steps to let the fingers close before lifting
RELEASE_STEPS = 4
RETREAT_HEIGHT = 0.22  # m, where the hand goes once the job is done
# While pushing, the tool centre point is at the cube's centre height: half its edge (the blue cube's
# is 6 cm, the red one's 4 cm; the scene reports each env's as `cube_size`)
PUSH_ALIGNED = 0.15  # rad: heading error at which pushing may start (the hand turns 0.2 rad per step)
HELD_RADIUS = 0.025  # m from the grasp point to the cube centre within which closed fingers hold it
LOST_RADIUS = 0.04  # m beyond which a grasp (or one being closed) has lost the cube

PICK, PUSH, STACK = (VERBS.index(verb) for verb in ("pick", "push", "stack"))  # what each env's task does

# Phases (shared numbering; each task uses a subset: pick/stack go APPROACH -> CLOSE, push APPROACH -> PUSHING).
APPROACH, CLOSE, LIFT, CARRY, LOWER, RELEASE, RETREAT, PUSHING = range(8)


class ScriptedExpert:
    def __init__(self, task_ids: torch.Tensor, follow_state: bool = False) -> None:
        """`task_ids` index TASK_NAMES; the expert acts on each task's verb (a blue-cube task is its red
        twin on the cube the scene reports). `follow_state`: correct the phase from the state before
        every action (labelling another policy's states, see the module docstring)."""
        self.verbs = VERB_OF_TASK[task_ids]  # verb ids: PICK, PUSH or STACK
        n = task_ids.shape[0]
        self.phase = torch.full((n,), APPROACH, dtype=torch.long)
        self.timer = torch.zeros(n, dtype=torch.long)
        self.grasp_yaw = torch.zeros(n)
        self.follow_state = follow_state

    def act(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        hand_pos, hand_quat = state["hand_pos"], state["hand_quat"]
        cube, base, target = state["cube_pos"], state["base_pos"], state["target_pos"]
        half = state.get("cube_size", torch.full((cube.shape[0],), CUBE_SIZE))[:, None] / 2  # [B, 1]
        tcp = hand_pos - torch.tensor([0.0, 0.0, TCP_OFFSET])  # hand points down throughout
        if self.follow_state:
            self._follow(tcp, cube, state["gripper_closed"])
        hand_yaw = quat_yaw(hand_quat)  # heading of the hand's x axis on the table plane

        # Default: hold position, keep the current heading, gripper open.
        goal_tcp = tcp.clone()
        goal_yaw = hand_yaw.clone()
        close = torch.zeros_like(self.phase, dtype=torch.bool)
        # Where the cube should go (stack) is steered through the cube's own position, not the hand's.
        move_cube_to: torch.Tensor | None = None

        is_push = self.verbs == PUSH
        push_dir = target[:, :2] - cube[:, :2]
        push_dist = push_dir.norm(dim=-1, keepdim=True)
        push_dir = push_dir / push_dist.clamp_min(1e-6)
        push_yaw = hand_yaw + wrap_angle(torch.atan2(push_dir[:, 1], push_dir[:, 0]) - hand_yaw, math.pi)
        behind = cube[:, :2] - push_dir * (half + 0.03)

        phase = self.phase
        # -- approach: down a funnel onto the cube centre (pick/stack; heading kept, see the module
        #    docstring), or onto the pre-push point behind the cube, turning to the push direction (push)
        m = phase == APPROACH
        xy_dist = (cube[:, :2] - tcp[:, :2]).norm(dim=-1, keepdim=True)
        height = torch.clamp(FUNNEL * (xy_dist - FUNNEL_SLACK), min=0.0, max=HOVER)
        funnel = cube + height * torch.tensor([0.0, 0.0, 1.0])
        behind_dist = (behind - tcp[:, :2]).norm(dim=-1, keepdim=True)
        behind_height = torch.clamp(FUNNEL * (behind_dist - FUNNEL_SLACK), min=0.0, max=HOVER)
        behind_funnel = torch.cat((behind, half + behind_height), dim=1)
        goal_tcp[m] = torch.where(is_push[m, None], behind_funnel[m], funnel[m])
        goal_yaw[m] = torch.where(is_push[m], push_yaw[m], hand_yaw[m])
        close[m] = is_push[m]
        # -- close the fingers in place
        m = phase == CLOSE
        close[m] = True
        # -- lift: straight up (pick ends here; stack lifts to carrying height)
        m = phase == LIFT
        goal_tcp[m, 2] = torch.where(self.verbs[m] == PICK, 0.20, 0.16)
        close[m] = True
        # -- carry / lower: steer the held cube above, then onto, the blue cube
        base_top = base[:, 2] + BASE_SIZE / 2
        above_base = torch.cat((base[:, :2], (base_top + CUBE_SIZE / 2 + 0.04)[:, None]), dim=1)
        onto_base = torch.cat((base[:, :2], (base_top + CUBE_SIZE / 2 + 0.004)[:, None]), dim=1)
        move_cube_to = torch.where((phase == CARRY)[:, None], above_base, onto_base)
        steer = (phase == CARRY) | (phase == LOWER)
        close[steer] = True
        # -- release, then retreat upward
        m = phase == RETREAT
        goal_tcp[m, 2] = RETREAT_HEIGHT
        # -- pushing: keep a point behind the cube and lean forward through it, until on target
        m = phase == PUSHING
        lead = torch.clamp(push_dist[m], max=0.02)
        goal_tcp[m, :2] = cube[m, :2] - push_dir[m] * (half[m] + 0.012) + push_dir[m] * lead
        goal_tcp[m, 2] = half[m, 0]
        goal_yaw[m] = push_yaw[m]
        close[m] = True

        delta = goal_tcp - tcp
        delta[steer] = (move_cube_to - cube)[steer]
        delta = GAIN * delta
        norm = delta.norm(dim=-1, keepdim=True)
        max_step = torch.where(phase == PUSHING, PUSH_STEP, MAX_STEP)[:, None]
        delta = delta * torch.clamp(max_step / norm.clamp_min(1e-9), max=1.0)
        rot_err = quat_to_axis_angle(quat_mul(top_down_quat(goal_yaw), quat_conj(hand_quat)))
        turn = torch.clamp(rot_err.norm(dim=-1, keepdim=True), max=MAX_TURN)
        rot = rot_err / rot_err.norm(dim=-1, keepdim=True).clamp_min(1e-9) * turn
        gripper = torch.where(close, 1.0, -1.0)[:, None]

        # Pushing only works from behind the cube: if the cube turned away or slid past the target,
        # the hand is no longer behind it, so go back up and line up again.
        rel = tcp[:, :2] - cube[:, :2]
        along = (rel * push_dir).sum(dim=-1)
        across = (rel[:, 0] * push_dir[:, 1] - rel[:, 1] * push_dir[:, 0]).abs()
        lost = (phase == PUSHING) & ((along > -half[:, 0] / 2) | (across > 0.025)) & (push_dist.squeeze(1) > 0.01)

        self._advance(tcp, goal_tcp, hand_yaw, goal_yaw, cube, move_cube_to, push_dist.squeeze(1), lost)
        return torch.cat((delta, rot, gripper), dim=1)

    def _follow(self, tcp: torch.Tensor, cube: torch.Tensor, closed: torch.Tensor) -> None:
        """The phase the state says, where the expert's own history (driven by another policy's
        actions) says otherwise. Push needs none: its phases already follow the cube (`lost`)."""
        distance = (cube - tcp).norm(dim=-1)
        grasping = self.verbs != PUSH
        phase = self.phase.clone()
        carrying = (phase == LIFT) | (phase == CARRY) | (phase == LOWER)
        phase[grasping & (self.phase == APPROACH) & closed & (distance < HELD_RADIUS)] = LIFT  # the policy grasped it
        phase[grasping & carrying & ~closed & (distance < HELD_RADIUS)] = CLOSE  # it opened the fingers on the cube
        phase[grasping & (carrying | (self.phase == CLOSE)) & (distance >= LOST_RADIUS)] = APPROACH  # it lost the cube
        self.timer[phase != self.phase] = 0
        self.phase = phase

    def _advance(
        self,
        tcp: torch.Tensor,
        goal_tcp: torch.Tensor,
        yaw: torch.Tensor,
        goal_yaw: torch.Tensor,
        cube: torch.Tensor,
        cube_goal: torch.Tensor,
        push_dist: torch.Tensor,
        lost_contact: torch.Tensor,
    ) -> None:
        """Phase transitions, evaluated on the state the action was computed from."""
        phase, task = self.phase, self.verbs
        reached = (goal_tcp - tcp).norm(dim=-1) < 0.01
        aligned = wrap_angle(goal_yaw - yaw, 2 * math.pi).abs() < PUSH_ALIGNED
        cube_reached = (cube_goal - cube).norm(dim=-1) < 0.008
        self.timer += 1
        nxt = phase.clone()
        nxt[(phase == APPROACH) & reached & (task != PUSH)] = CLOSE  # the funnel ends at the cube centre
        nxt[(phase == APPROACH) & reached & aligned & (task == PUSH)] = PUSHING  # the funnel ends behind the cube
        nxt[(phase == CLOSE) & (self.timer >= CLOSE_STEPS)] = LIFT
        nxt[(phase == LIFT) & (task == STACK) & (tcp[:, 2] > 0.12)] = CARRY
        nxt[(phase == CARRY) & cube_reached] = LOWER
        nxt[(phase == LOWER) & cube_reached] = RELEASE
        nxt[(phase == RELEASE) & (self.timer >= RELEASE_STEPS)] = RETREAT
        nxt[(phase == PUSHING) & (push_dist < 0.01)] = RETREAT
        nxt[lost_contact] = APPROACH
        self.timer[nxt != phase] = 0
        self.phase = nxt

