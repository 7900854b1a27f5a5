"""Where `vla-dist train` sends its numbers: metrics.jsonl always, TensorBoard and W&B on request.

The driver (sft.py) calls one object, `RunLoggers`: `train(row)` per optimizer step, `eval(row,
videos)` per training-time eval (train/evals.py), `close()` at the end. Every numeric metric goes
to every logger; the JSON rows are the record, the others are views of it.

Videos in TensorBoard: `SummaryWriter.add_video` needs moviepy 1.x (`moviepy.editor`, gone in
moviepy 2) and otherwise logs nothing, so we encode each eval video as an animated GIF with PIL
and write it as an image summary ourselves, which is what add_video does inside. TensorBoard's
Images tab plays it.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vla_dist.config.schema import RunConfig
from vla_dist.errors import ConfigError
from vla_dist.train.metrics import MetricsLog

# per-step metrics that become TensorBoard/W&B scalars (the row's other keys are bookkeeping)
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "nan_skipped")
TENSORBOARD_DIR = "tensorboard"
GIF_SIDE = 128  # eval GIFs are upscaled (nearest) to about this height: sim images are 32-64 px
LOGGED_VIDEOS = 2  # per eval, to TensorBoard/W&B (run.dir/evals/step_N/videos has eval.num_videos mp4s)


def check_loggers(cfg: RunConfig) -> None:
    """Before any work: a logger asked for must be importable (the message says what to install)."""
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("train.tensorboard", "needs the tensorboard package: pip install tensorboard") from None
    if cfg.train.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("train.wandb", "needs Weights & Biases: pip install 'vla-dist[wandb]' (or "
                              "pip install wandb), or set train.wandb=false") from None


def eval_scalars(row: dict[str, Any]) -> dict[str, float]:
    """An eval row of metrics.jsonl as flat scalar names: eval/success_rate, eval/pick_cube/success_rate, ..."""
    out = {"eval/success_rate": row["success_rate"], "eval/success_ci95_low": row["ci95"][0],
           "eval/success_ci95_high": row["ci95"][1], "eval/episodes": row["episodes"]}
    for name in ("closest_approach_cm", "export_s", "eval_wall_s"):
        if row.get(name) is not None:
            out[f"eval/{name}"] = row[name]
    for task, stats in row.get("per_task", {}).items():
        out[f"eval/{task}/success_rate"] = stats["success_rate"]
        out[f"eval/{task}/success_ci95_low"], out[f"eval/{task}/success_ci95_high"] = stats["ci95"]
        if stats.get("closest_approach_cm") is not None:
            out[f"eval/{task}/closest_approach_cm"] = stats["closest_approach_cm"]
    return {k: float(v) for k, v in out.items()}


def train_scalars(row: dict[str, Any]) -> dict[str, float]:
    return {f"train/{k}": float(row[k]) for k in TRAIN_SCALARS if row.get(k) is not None}


class RunLoggers:
    def __init__(self, cfg: RunConfig, resumed_step: int) -> None:
        run_dir = Path(cfg.run.dir)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", resumed_step=resumed_step)
        self.tensorboard = TensorBoardLog(run_dir / TENSORBOARD_DIR, resumed_step) if cfg.train.tensorboard else None
        self.wandb = WandbLog(cfg) if cfg.train.wandb else None

    def train(self, row: dict[str, Any]) -> None:
        self.metrics.write(row)
        self._scalars(train_scalars(row), row["step"])

    def eval(self, row: dict[str, Any], videos: list[tuple[str, np.ndarray, float, str]]) -> None:
        """`videos`: (name, frames [T, H, W, 3] uint8, fps, mp4 path) of a few episodes of this eval."""
        self.metrics.write(row)
        self._scalars(eval_scalars(row), row["step"])
        for name, frames, fps, mp4 in videos[:LOGGED_VIDEOS]:
            if self.tensorboard is not None:
                self.tensorboard.gif(f"eval/video/{name}", frames, fps, row["step"])
            if self.wandb is not None:
                self.wandb.video(f"eval/video/{name}", mp4, row["step"])

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.scalars(values, step)
        if self.wandb is not None:
            self.wandb.log(values, step)

    def close(self) -> None:
        for logger in (self.tensorboard, self.wandb):
            if logger is not None:
                logger.close()


class TensorBoardLog:
    """torch's SummaryWriter (tensorboard's event-file format), offline, under run.dir/tensorboard."""

    def __init__(self, log_dir: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides what the crashed one logged after its checkpoint (as MetricsLog drops it)
        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_step + 1 if resumed_step else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a person watching `tensorboard --logdir` sees each step as it lands

    def gif(self, tag: str, frames: np.ndarray, fps: float, step: int) -> None:
        self.writer._get_file_writer().add_summary(gif_summary(tag, frames, fps), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def gif_summary(tag: str, frames: np.ndarray, fps: float) -> Any:
    """An image summary holding an animated GIF of `frames` [T, H, W, 3] uint8."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    scale = max(1, GIF_SIDE // frames.shape[1])
    frames = np.repeat(np.repeat(frames, scale, axis=1), scale, axis=2)
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    _, height, width, channels = frames.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class WandbLog:
    """Weights & Biases, offline (files under run.dir/wandb, `wandb sync` uploads them later) unless
    WANDB_API_KEY is set or WANDB_MODE says otherwise. Eval rows arrive after later training steps
    were logged, so every metric is plotted against our `step` metric, not W&B's own counter (which
    only moves forward and would drop them)."""

    def __init__(self, cfg: RunConfig) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run_dir = Path(cfg.run.dir)
        self.wandb = wandb
        # console="off": W&B would otherwise wrap stdout, under the driver's progress bar
        self.run = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), mode=mode, name=run_dir.name,
                              config=asdict(cfg), settings=wandb.Settings(console="off"))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def video(self, tag: str, mp4: str, step: int) -> None:
        self.run.log({tag: self.wandb.Video(mp4, format="mp4"), "step": step})

    def close(self) -> None:
        self.run.finish()
