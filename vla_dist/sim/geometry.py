"""Quaternion helpers in Genesis' (w, x, y, z) convention, batched over a leading dimension (torch)."""

from __future__ import annotations

import torch


def quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def quat_conj(q: torch.Tensor) -> torch.Tensor:
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=q.dtype, device=q.device)


def quat_rotate(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate vectors v [..., 3] by unit quaternions q [..., 4]: q * (0, v) * conj(q)."""
    pure = torch.cat((torch.zeros_like(v[..., :1]), v), dim=-1)
    return quat_mul(quat_mul(q, pure), quat_conj(q))[..., 1:]


def axis_angle_to_quat(rotvec: torch.Tensor) -> torch.Tensor:
    angle = rotvec.norm(dim=-1, keepdim=True)
    half = 0.5 * angle
    # sin(x)/x is smooth at 0; use the Taylor form there to avoid 0/0.
    scale = torch.where(angle > 1e-8, torch.sin(half) / angle.clamp_min(1e-8), 0.5 - angle**2 / 48.0)
    return torch.cat((torch.cos(half), rotvec * scale), dim=-1)


def quat_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    q = torch.where(q[..., :1] < 0, -q, q)  # shortest rotation
    vec = q[..., 1:]
    sin_half = vec.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, q[..., :1])
    scale = torch.where(sin_half > 1e-8, angle / sin_half.clamp_min(1e-8), 2.0 + 0.0 * angle)
    return vec * scale


def top_down_quat(yaw: torch.Tensor) -> torch.Tensor:
    """Gripper pointing straight down (180 deg about x), then rotated by `yaw` about world z."""
    half = 0.5 * yaw
    zeros = torch.zeros_like(yaw)
    return torch.stack((zeros, torch.cos(half), torch.sin(half), zeros), dim=-1)


def yaw_quat(yaw: torch.Tensor) -> torch.Tensor:
    half = 0.5 * yaw
    zeros = torch.zeros_like(yaw)
    return torch.stack((torch.cos(half), zeros, zeros, torch.sin(half)), dim=-1)


def quat_yaw(q: torch.Tensor) -> torch.Tensor:
    """Heading of a body's x axis in the world xy plane."""
    w, x, y, z = q.unbind(-1)
    return torch.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def wrap_angle(a: torch.Tensor, period: float) -> torch.Tensor:
    """Wrap into [-period/2, period/2): a cube is symmetric under quarter turns."""
    return torch.remainder(a + 0.5 * period, period) - 0.5 * period
