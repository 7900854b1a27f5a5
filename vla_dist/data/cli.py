"""The dataset commands of the CLI: `vla-dist import lerobot SRC --out DATA_DIR` and
`vla-dist export-data lerobot DATA_DIR --out DIR`. No Ray, torch or Genesis at import."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from vla_dist.config import ConfigError, RunConfig

COMMANDS = ("import", "export-data")


def add_commands(
    commands: argparse._SubParsersAction, add_config_arguments: Callable[[argparse.ArgumentParser], None]
) -> None:
    importer = commands.add_parser(
        "import",
        help="a LeRobot v3.0 dataset -> vla-dist shards + manifest",
        description="Read a local LeRobot v3.0 dataset (meta/info.json, data/*.parquet, videos/*.mp4; nothing is "
        "downloaded) and write it as vla-dist WebDataset shards + manifest.json to --out: every video camera "
        "(observation.images.<name> becomes camera <name>), observation.state, action, the task string as the "
        "instruction, fps; statistics recomputed. Episodes with broken files are skipped and counted. The manifest "
        "is written last: an interrupted import leaves none, and running it again keeps the groups of episodes it "
        "finished. Train on it with `vla-dist train data.dir=OUT`; score offline with eval.offline_data.",
    )
    importer.add_argument("format", choices=["lerobot"], help="the source format")
    importer.add_argument("src", metavar="SRC", help="the source dataset directory")
    importer.add_argument("--out", required=True, metavar="DATA_DIR", help="output dataset directory")
    importer.add_argument("--image-size", type=int, default=0, metavar="N",
                          help="resize every frame to N x N (default 0: keep the source's, square frames only)")
    importer.add_argument("--workers", type=int, default=1, metavar="N",
                          help="import groups of data.shard_max_episodes episodes as N parallel Ray tasks on the "
                          "configured cluster (cluster.address; default 1: in this process)")
    importer.add_argument("--strict", action="store_true",
                          help="fail on the first episode with a missing or broken file (default: skip it, count it, "
                          "name it in the report and the manifest)")
    add_config_arguments(importer)

    exporter = commands.add_parser(
        "export-data",
        help="vla-dist shards -> a LeRobot v3.0 dataset",
        description="Write the vla-dist dataset DATA_DIR (collected or imported; every shard is checked against "
        "its manifest's sha256 first) as a LeRobot v3.0 dataset in the new directory --out, which LeRobot's "
        "LeRobotDataset(repo_id, root=OUT), its viewer and its training scripts open: cameras as "
        "observation.images.<camera> mp4 streams, observation.state, action, each episode's instruction as its "
        "task, fps, meta/stats.json. Written under OUT.partial and renamed when complete.",
    )
    exporter.add_argument("format", choices=["lerobot"], help="the target format")
    exporter.add_argument("data_dir", metavar="DATA_DIR", help="the vla-dist dataset directory (with manifest.json)")
    exporter.add_argument("--out", required=True, metavar="DIR", help="the new LeRobot dataset directory")
    exporter.add_argument("--vcodec", choices=["h264", "av1"], default="h264",
                          help="video codec (default h264, playable everywhere; av1 is LeRobot's own default)")
    exporter.add_argument("--robot-type", default=None, metavar="NAME",
                          help="info.json's robot_type (default: the source's when imported, else franka_panda)")
    add_config_arguments(exporter)


def run(args: argparse.Namespace, cfg: RunConfig) -> tuple[dict[str, Any], str]:
    """Run `import` or `export-data`; -> (report, where the output is). The user's input being
    wrong (a broken source file, an occupied --out) raises ConfigError: exit 2, file named."""
    from vla_dist.data.lerobot import LeRobotFormatError
    from vla_dist.data.lerobot_export import LeRobotExportError, export_lerobot
    from vla_dist.data.lerobot_import import import_lerobot
    from vla_dist.data.manifest import ManifestError
    from vla_dist.rollout.progress import count_progress

    if args.command == "import" and (args.image_size < 0 or args.workers < 1):
        raise ConfigError(None, f"--image-size must be >= 0 and --workers >= 1, got {args.image_size}, {args.workers}")
    started = time.perf_counter()
    with count_progress("ep") as progress:
        bar = progress.add_task(args.command, total=None, rate=0.0)

        def on_episode(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total or None,
                            rate=done / max(time.perf_counter() - started, 1e-9))

        try:
            if args.command == "import":
                report = import_lerobot(args.src, args.out, image_size=args.image_size, codec=cfg.data.image_codec,
                                        shard_max_episodes=cfg.data.shard_max_episodes, workers=args.workers,
                                        strict=args.strict, submit=_ray_tasks(cfg, args.workers),
                                        on_episode=on_episode)
                for skip in report.pop("skipped")[:20]:
                    print(f"skipped episode {skip['episode']}: {skip['why']}", file=sys.stderr)
                return report, f"shards: {args.out}   train: vla-dist train data.dir={args.out}"
            report = export_lerobot(args.data_dir, args.out, vcodec=args.vcodec, robot_type=args.robot_type,
                                    on_episode=on_episode)
            return report, f"LeRobot dataset: {args.out}   open: LeRobotDataset('local/NAME', root='{args.out}')"
        except (LeRobotFormatError, LeRobotExportError, ManifestError, FileNotFoundError) as error:
            raise ConfigError(None, str(error)) from None


def _ray_tasks(cfg: RunConfig, workers: int) -> Callable[..., Any] | None:
    """submit(fn, *args) -> a Ray task of one CPU on the configured cluster; None for one worker."""
    if workers <= 1:
        return None
    import ray

    from vla_dist.runtime import init_ray

    init_ray(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.cache_dir)
    return lambda fn, *args: ray.remote(num_cpus=1, max_retries=2)(fn).remote(*args)
