"""Command-line front of the multi-node pieces, shaped for `vla-dist`'s parser:

    vla-dist cluster render slurm|kuberay|autoscaler [--out DIR] [--job COMMAND] [--config FILE] [KEY=VALUE...]
    vla-dist submit COMMAND [--no-wait] [--working-dir DIR] [--job-id ID] [--config FILE] [KEY=VALUE...]
    vla-dist job status|logs|stop JOB_ID [--follow] [--config FILE] [KEY=VALUE...]

`add_commands(subparsers, add_config_arguments)` registers them; `run(args, cfg)` runs one and
returns the exit code (ConfigError / VlaDistError propagate to the caller's exit-code mapping).
Until they are wired into `vla-dist`, `python -m vla_dist.cluster.cli ...` runs the same commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from vla_dist.cluster.jobspec import JOB_COMMANDS
from vla_dist.config import load_config, validate
from vla_dist.config.schema import RunConfig, RunSection
from vla_dist.errors import ConfigError, VlaDistError

TARGETS = ("slurm", "kuberay", "autoscaler")
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO_ROOT / "cluster" / "two-node.yaml"


def add_commands(
    commands: argparse._SubParsersAction, add_config_arguments: Callable[[argparse.ArgumentParser], None]
) -> None:
    cluster = commands.add_parser(
        "cluster", help="render cluster files (SLURM sbatch, KubeRay manifests, autoscaler YAML)",
        description="Write the files that bring a Ray cluster up for vla-dist, from the config.")
    actions = cluster.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)
    render = actions.add_parser("render", help="write the cluster files for TARGET",
                                description="slurm: DIR/vla-dist.sbatch + DIR/config.yaml (sbatch it); kuberay: "
                                "raycluster.yaml (+ rayjob.yaml when cluster.kuberay.dashboard_host allows); "
                                "autoscaler: ray-cluster.yaml for `ray up`.")
    render.add_argument("target", choices=TARGETS, metavar="TARGET", help=f"one of: {', '.join(TARGETS)}")
    render.add_argument("--out", metavar="DIR", default=None,
                        help="output directory "
                             "(slurm: RUN_DIR/slurm, on the shared filesystem; else ./vla-dist-TARGET)")
    render.add_argument("--job", metavar="COMMAND", default="collect",
                        help="the vla-dist command the job runs (default: collect)")
    add_config_arguments(render)

    submit = commands.add_parser(
        "submit", help="run a command on a Ray cluster through Ray Jobs, following its logs",
        description="Validate the config here, ship it with the job to cluster.dashboard_address "
        "(tunnel the head's 127.0.0.1:8265 first), stream the logs, exit with the job's exit code.")
    plain = ", ".join(name for name in JOB_COMMANDS if name != "bench")
    submit.add_argument("job_command", metavar="COMMAND", help=f"{plain}, or 'bench NAME' (quoted)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("--working-dir", metavar="DIR", default=None,
                        help="upload DIR and run its code (default: the vla-dist installed on the cluster)")
    submit.add_argument("--job-id", metavar="ID", default=None, help="the submission id (default: generated)")
    add_config_arguments(submit)

    job = commands.add_parser("job", help="status, logs or stop of a submitted job")
    job.add_argument("job_action", choices=("status", "logs", "stop"), metavar="ACTION", help="status, logs or stop")
    job.add_argument("job_id", metavar="JOB_ID")
    job.add_argument("--follow", action="store_true", help="logs: keep streaming until the job ends")
    add_config_arguments(job)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    if args.command == "cluster":
        return _render(cfg, args.target, args.out, args.job)
    if args.command == "submit":
        from vla_dist.launch import describe, submit_and_follow

        report = submit_and_follow(cfg, args.job_command, working_dir=args.working_dir, job_id=args.job_id,
                                   wait=not args.no_wait, on_line=lambda line: print(line, flush=True))
        print(describe(report), file=sys.stderr if report.command_exit_code() else sys.stdout)
        return report.command_exit_code() if not args.no_wait else 0
    if args.command == "job":
        return _job(cfg, args.job_action, args.job_id, args.follow)
    raise ConfigError(None, f"unknown command {args.command!r}")


def rendered(cfg: RunConfig, target: str, out: Path, job: str = "collect") -> tuple[dict[str, str], list[str]]:
    """The files for `target` as {name: text}, with paths inside pointing at `out`; and notes."""
    if target == "slurm":
        from vla_dist.cluster.slurm import render_sbatch

        return render_sbatch(cfg, out, command=job), []
    if target == "kuberay":
        from vla_dist.cluster.kuberay import render_kuberay

        return render_kuberay(cfg, command=job)
    if target == "autoscaler":
        from vla_dist.cluster.autoscaler import render_autoscaler

        return render_autoscaler(cfg), []
    raise ConfigError(None, f"unknown target {target!r}; one of: {', '.join(TARGETS)}")


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        if name.endswith(".sbatch"):
            path.chmod(0o755)
        paths.append(path)
    return paths


def default_out(cfg: RunConfig, target: str) -> Path:
    if target == "slurm":
        from vla_dist.cluster.jobspec import cluster_job_config

        return Path(cluster_job_config(cfg).run.dir) / "slurm"
    return Path(f"vla-dist-{target}")


def _render(cfg: RunConfig, target: str, out: str | None, job: str) -> int:
    out_dir = Path(out) if out else default_out(cfg, target)
    files, notes = rendered(cfg, target, out_dir, job)
    if target == "slurm" and cfg.run.dir == RunSection().dir:
        shared = (f"run.dir is the quickstart's default ({cfg.run.dir}): this job writes its outputs there, beside "
                  "any quickstart run (and its script there too unless --out); give the job its own run.dir=... "
                  "(cluster/two-node.yaml shows a cluster config)")
        notes = [*notes, shared]
    paths = write_files(files, out_dir)
    for path in paths:
        print(f"wrote {path}")
    for note in notes:
        print(f"note: {note}")
    if target == "slurm":
        print(f"submit: sbatch {paths[0]}")
    return 0


def _job(cfg: RunConfig, action: str, job_id: str, follow: bool) -> int:
    from vla_dist import launch

    address = cfg.cluster.dashboard_address
    if action == "status":
        report = launch.status(address, job_id)
        print(json.dumps(report.to_dict()))
        return 0
    if action == "logs":
        if follow:
            launch.follow_logs(address, job_id, lambda line: print(line, flush=True))
        else:
            print(launch.logs(address, job_id), end="")
        return 0
    print(f"stop requested: {launch.stop(address, job_id)}")
    return 0


def example_files(job: str = "train") -> dict[Path, str]:
    """The committed examples under cluster/ (rendered from cluster/two-node.yaml), by path relative
    to cluster/; tests check the committed copies are current. The SLURM files name the job
    directory on the example cluster (/shared/...), as a lab's render would."""
    cfg = validate(load_config(EXAMPLE_CONFIG, []))
    with_job = validate(load_config(EXAMPLE_CONFIG, ["cluster.kuberay.dashboard_host=0.0.0.0"]))
    examples: dict[Path, str] = {}
    for target, target_cfg in (("slurm", cfg), ("kuberay", with_job), ("autoscaler", cfg)):
        files, _ = rendered(target_cfg, target, default_out(target_cfg, target), job)
        # Not the SLURM job's config.yaml: it is the whole config, which changes with every new key.
        examples.update(
            {Path(target) / "example" / name: text for name, text in files.items() if name != "config.yaml"})
    return examples


def render_examples(root: Path = REPO_ROOT / "cluster") -> list[Path]:
    paths = []
    for relative, text in example_files().items():
        paths += write_files({relative.name: text}, root / relative.parent)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vla_dist.cluster.cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_config_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", metavar="FILE", default=None)
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    add_commands(commands, add_config_arguments)
    commands.add_parser("examples", help="re-render the committed examples under cluster/")
    # As in vla-dist: KEY=VALUE after an option are left over by argparse; they are overrides too.
    args, leftovers = parser.parse_known_args(argv)
    unknown = [arg for arg in leftovers if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *leftovers]
    try:
        if args.command == "examples":
            for path in render_examples():
                print(f"wrote {path}")
            return 0
        return run(args, validate(load_config(args.config, args.overrides)))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except VlaDistError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
