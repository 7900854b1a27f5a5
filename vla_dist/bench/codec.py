"""Image codec benchmark: bytes, encode/decode time and pixel error of one camera's episode video.

    python -m vla_dist.bench.codec     # synthetic sim-like videos, 64x64 and 128x128, 60 frames

Measures our two shard codecs (mp4 = H.264 crf MP4_CRF, npz = zlib) and, for reference, per-frame
JPEG (PIL, quality 90) when PIL is installed. The last stdout line is one JSON object
(`name`, `value`, `unit`, `baseline`, `ratio`, `device`, `details`), as every `vla-dist bench` prints.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from vla_dist.bench.common import bench_report
from vla_dist.data.codec import MP4_CRF, decode_frames, decode_h264, encode_frames, encode_h264

if TYPE_CHECKING:
    from vla_dist.config.schema import RunConfig

JPEG_QUALITY = 90
REPEATS = 3  # timings are the median of this many runs: the machine may be busy


def bench_codec(frames: np.ndarray, fps: float) -> dict:
    """Benchmark every codec on `frames` (uint8 [T, H, W, 3], one camera of one episode)."""
    codecs: dict[str, tuple[Callable[[], bytes], Callable[[bytes], np.ndarray]]] = {
        "mp4": (lambda: encode_frames(frames, "mp4", fps), lambda data: decode_frames(data, "mp4")),
        "npz": (lambda: encode_frames(frames, "npz", fps), lambda data: decode_frames(data, "npz")),
        # reference: the same H.264 settings with full-resolution colour (not what shards use)
        "mp4_yuv444p": (lambda: encode_h264(frames, fps, crf=MP4_CRF, pix_fmt="yuv444p"), decode_h264),
    }
    jpeg = _jpeg_codec(frames)
    if jpeg is not None:
        codecs["jpeg"] = jpeg
    details = {name: _measure(frames, encode, decode) for name, (encode, decode) in codecs.items()}
    num_frames, height, width, _ = frames.shape
    for detail in details.values():
        detail["frames"], detail["height"], detail["width"] = num_frames, height, width
    mp4_bytes, npz_bytes = details["mp4"]["bytes"], details["npz"]["bytes"]
    # one camera's video of one episode
    return bench_report("codec", mp4_bytes, "bytes/episode", npz_bytes, npz_bytes / mp4_bytes,
                        "npz (lossless) bytes / mp4 bytes for one camera's episode", device="cpu", details=details)


def _measure(
    frames: np.ndarray, encode: Callable[[], bytes], decode: Callable[[bytes], np.ndarray]
) -> dict[str, float | int | None]:
    encode_s, decode_s = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        data = encode()
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = decode(data)
        decode_s.append(time.perf_counter() - start)
    if decoded.shape != frames.shape:
        raise RuntimeError(f"codec returned shape {decoded.shape}, expected {frames.shape}")
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
    mse = float(np.mean(error.astype(np.float64) ** 2))
    return {
        "bytes": len(data),
        "encode_ms": 1000 * float(np.median(encode_s)),
        "decode_ms": 1000 * float(np.median(decode_s)),
        "max_abs_error": int(error.max()),
        "mean_abs_error": float(error.mean()),
        "psnr_db": None if mse == 0 else 10 * float(np.log10(255.0**2 / mse)),  # None: lossless
    }


def _jpeg_codec(frames: np.ndarray) -> tuple[Callable[[], bytes], Callable[[bytes], np.ndarray]] | None:
    """Per-frame JPEG as a list of length-prefixed blobs; None when PIL is not installed."""
    try:
        from PIL import Image
    except ImportError:
        return None

    def encode() -> bytes:
        out = io.BytesIO()
        for frame in frames:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY)
            out.write(len(buf.getvalue()).to_bytes(4, "little") + buf.getvalue())
        return out.getvalue()

    def decode(data: bytes) -> np.ndarray:
        decoded, offset = [], 0
        while offset < len(data):
            size = int.from_bytes(data[offset : offset + 4], "little")
            blob = data[offset + 4 : offset + 4 + size]
            decoded.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
            offset += 4 + size
        return np.stack(decoded)

    return encode, decode


def synthetic_video(size: int, num_frames: int = 60, camera: str = "front", seed: int = 0) -> np.ndarray:
    """A sim-like camera video, uint8 [num_frames, size, size, 3]: a textured table under a light
    gradient, three shaded boxes moving on smooth paths (one passes another) and a dark gripper bar;
    2x supersampled, so edges are anti-aliased as a renderer's are. camera="front" is fixed (the
    background is static, which zlib and H.264 both exploit); camera="wrist" is zoomed in 2x and
    pans with the arm, so every pixel changes every frame."""
    if camera not in ("front", "wrist"):
        raise ValueError(f"camera must be 'front' or 'wrist', got {camera!r}")
    rng = np.random.default_rng(seed)
    hi = 2 * size
    grid_y, grid_x = np.mgrid[0:hi, 0:hi].astype(np.float32) / hi
    texture_res = 4 * hi  # fixed fine noise, a function of the table position like a texture map
    noise = rng.normal(0.0, 1.0, (texture_res, texture_res)).astype(np.float32)
    boxes = [  # colour, half size (table units), path centre, path radius, angular speed
        ((220, 40, 40), 0.09, (0.35, 0.55), (0.20, 0.10), 1.0),
        ((40, 180, 60), 0.07, (0.60, 0.45), (0.15, 0.20), -0.7),
        ((50, 80, 220), 0.11, (0.50, 0.70), (0.25, 0.05), 0.5),
    ]
    video = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        phase = 2 * np.pi * t / num_frames
        gripper_x = 0.5 + 0.3 * np.sin(0.8 * phase)
        gripper_y = 0.15 + 0.25 * (1 - np.cos(phase)) / 2
        if camera == "front":
            xx, yy = grid_x, grid_y
        else:  # look at the table around the gripper tip, half the field of view
            xx = np.clip(gripper_x - 0.25 + 0.5 * grid_x, 0, 1)
            yy = np.clip(gripper_y - 0.05 + 0.5 * grid_y, 0, 1)
        stripes = 0.5 + 0.5 * np.sin(40 * yy + 6 * np.sin(5 * xx))
        grain = noise[(yy * (texture_res - 1)).astype(int), (xx * (texture_res - 1)).astype(int)]
        image = np.stack([150 + 30 * stripes, 110 + 25 * stripes, 70 + 15 * stripes], -1)
        image += 8 * grain[..., None]
        image *= (0.75 + 0.35 * (1 - yy))[..., None]  # light from the far side
        for colour, half, (cx, cy), (rx, ry), speed in boxes:
            x0 = cx + rx * np.cos(speed * phase)
            y0 = cy + ry * np.sin(speed * phase)
            inside = (np.abs(xx - x0) < half) & (np.abs(yy - y0) < half)
            shade = 1.15 - 0.5 * (yy - (y0 - half)) / (2 * half)  # lit top face, darker bottom
            image[inside] = (np.asarray(colour, np.float32) * shade[..., None])[inside]
        gripper = (np.abs(xx - gripper_x) < 0.03) & (yy < gripper_y)
        image[gripper] = (40, 40, 45)
        small = image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
        video[t] = np.clip(small, 0, 255).astype(np.uint8)
    return video


def main() -> None:
    fps, num_frames, cameras = 10.0, 60, ("front", "wrist")
    per_size: dict[str, dict[str, dict]] = {}
    print(f"{'size':>7} {'camera':>6} {'codec':>11} {'bytes':>8} {'enc ms':>7} {'dec ms':>7} "
          f"{'max err':>7} {'mean err':>8} {'PSNR dB':>7}")
    for size in (64, 128):
        per_camera = {}
        for camera in cameras:
            per_camera[camera] = bench_codec(synthetic_video(size, num_frames, camera), fps)["details"]
            for codec, row in per_camera[camera].items():
                psnr = "lossless" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
                print(f"{size:>3}x{size:<3} {camera:>6} {codec:>11} {row['bytes']:>8} "
                      f"{row['encode_ms']:>7.1f} {row['decode_ms']:>7.1f} {row['max_abs_error']:>7} "
                      f"{row['mean_abs_error']:>8.2f} {psnr:>8}")
        per_size[f"{size}x{size}"] = per_camera
    # headline: one episode of the default config (64x64, front + wrist cameras), mp4 vs npz
    episode = per_size["64x64"]
    value = sum(episode[camera]["mp4"]["bytes"] for camera in cameras)
    baseline = sum(episode[camera]["npz"]["bytes"] for camera in cameras)
    result = bench_report(
        "codec", value, "bytes/episode", baseline, baseline / value, "npz (lossless) bytes / mp4 bytes for one episode",
        device="cpu",
        details={"episode": f"{len(cameras)} cameras x {num_frames} frames, synthetic sim-like video",
                 "fps": fps, "mp4_crf": MP4_CRF, "per_size": per_size},
    )
    print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    main()


def run_codec_bench(cfg: RunConfig) -> dict:
    """`vla-dist bench codec`: one episode at the configured image size and cameras, mp4 against the
    lossless npz baseline, on sim-like synthetic frames (no simulator needed)."""
    fps, num_frames = float(cfg.task.control_hz), 60
    details = {
        camera: bench_codec(synthetic_video(cfg.task.image_size, num_frames, camera), fps)["details"]
        for camera in cfg.task.cameras
    }
    value = sum(row["mp4"]["bytes"] for row in details.values())
    baseline = sum(row["npz"]["bytes"] for row in details.values())
    return bench_report("codec", value, "bytes/episode", baseline, baseline / value,
                        "npz (lossless) bytes / mp4 bytes for one episode",
                        image_size=cfg.task.image_size, frames=num_frames, details=details)
