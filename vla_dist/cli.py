"""The `vla-dist` command: parse -> load config -> validate -> run one command.

Exit codes (a contract, see shared/design.md): 0 ok; 2 bad config or usage; 1 runtime failure;
130 interrupted. Heavy libraries (ray, genesis, torch) are imported only inside the command
functions, so `--help` and config errors answer instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vla_dist.cli_parser import BENCHES, build_parser
from vla_dist.config import (
    ConfigError,
    RunConfig,
    load_config,
    save_resolved,
    to_yaml,
    validate,
)
from vla_dist.data.cli import COMMANDS as DATA_COMMANDS  # no Ray/torch at import
from vla_dist.errors import VlaDistError
from vla_dist.runtime import start_command, stop_command_ray  # stdlib only at import

Report = dict[str, Any]


def _run_bench(name: str, cfg: RunConfig) -> Report:
    import importlib

    module, function = BENCHES[name].split(":")
    return getattr(importlib.import_module(module), function)(cfg)


def _run(args: argparse.Namespace) -> int:
    start_command()  # quiet the libraries' noise before any of them is imported
    if args.command == "recipes":
        return _run_recipes(args)
    cfg = validate(load_config(args.config, args.overrides))
    if args.command == "quickstart":
        from vla_dist.quickstart import run_quickstart

        report = run_quickstart(args.config, args.overrides)
        _print_summary("quickstart", report, f"summary: {report['summary']}   plot: {report['summary_png']}")
    elif args.command == "config":
        print(to_yaml(cfg), end="")
    elif args.command == "collect":
        config_path = save_resolved(cfg, cfg.run.dir)
        from vla_dist.rollout.collect import run_collect

        where = f"shards: {cfg.data.dir}   run: {cfg.run.dir}   config: {config_path}"
        _print_summary("collect", run_collect(cfg), where)
    elif args.command == "eval":
        config_path = save_resolved(cfg, cfg.run.dir)
        if cfg.eval.offline_data is not None:  # no simulator: action error against recorded episodes
            from vla_dist.offline_eval import run_offline_eval

            report = run_offline_eval(cfg)
        else:
            from vla_dist.rollout.evaluate import run_eval

            report = run_eval(cfg)
        _print_summary("eval", report, f"run: {cfg.run.dir}   config: {config_path}")
    elif args.command == "replay":
        config_path = save_resolved(cfg, cfg.run.dir)
        from vla_dist.rollout.replay import run_replay

        report = run_replay(cfg)
        _print_summary("replay", report, f"report: {cfg.run.dir}/report.json   config: {config_path}")
    elif args.command == "train":
        from vla_dist.train import (
            run_train,  # writes run.dir/config.yaml itself (after resume checks)
        )

        report = run_train(cfg)
        _print_summary("train", report, f"run: {cfg.run.dir}   checkpoints: {cfg.run.dir}/checkpoints",
                       outcome=f"stopped by {report['stopped_by']}" if report.get("stopped_by") else "done")
    elif args.command == "rl":
        from vla_dist.rl.loop import run_rl

        report = run_rl(cfg)
        _print_summary("rl", report, f"run: {cfg.run.dir}   policy: {report['policy']}   plot: {report['success_png']}",
                       outcome=f"stopped by {report['stopped_by']}" if report.get("stopped_by") else "done")
    elif args.command == "dagger":
        from vla_dist.dagger import run_dagger

        config_path = save_resolved(cfg, cfg.run.dir)
        report = run_dagger(cfg)
        _print_summary("dagger", report, f"run: {cfg.run.dir}   policy: {report['policy']}   plot: {report['plot']}   "
                       f"config: {config_path}",
                       outcome=f"stopped by {report['stopped_by']}" if report.get("stopped_by") else "done")
    elif args.command == "select":
        from vla_dist.select import run_select

        config_path = save_resolved(cfg, cfg.run.dir)
        report = run_select(cfg)
        _print_summary("select", report, f"data: {cfg.data.dir}   report: {cfg.run.dir}/report.json   "
                       f"plot: {report['plot']}   config: {config_path}")
    elif args.command in DATA_COMMANDS:
        from vla_dist.data.cli import run as run_data_command

        _print_summary(args.command, *run_data_command(args, cfg))
    elif args.command == "export":
        from vla_dist.checkpoint.export import export_checkpoint

        _print_summary("export", export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora),
                       f"out: {args.out}")
    elif args.command in ("cluster", "submit", "job"):
        from vla_dist.cluster.cli import run as run_cluster_command

        return run_cluster_command(args, cfg)
    elif args.command == "bench":
        report = _run_bench(args.name, cfg)
        stop_command_ray()  # no actor line after the JSON line
        print(json.dumps(report, default=str), flush=True)
    return 0


def _run_recipes(args: argparse.Namespace) -> int:
    """Words without '=' are recipe names, the rest overrides; the baseline's file is the config."""
    from vla_dist.recipes.run import baseline_name, recipe_file

    if args.config is not None:
        raise ConfigError(None, "vla-dist recipes takes recipe names (configs/recipe/NAME.yaml or .yaml paths), "
                          "not --config; the baseline is recipes.baseline")
    names = [word for word in args.overrides if "=" not in word]
    overrides = [word for word in args.overrides if "=" in word]
    if args.action == "report":
        if names:
            raise ConfigError(None, f"vla-dist recipes report takes no recipe names, got {names}")
        from vla_dist.recipes.report import write_report

        cfg = validate(load_config(recipe_file(baseline_name(overrides)), overrides))  # its recipes.dir
        report = write_report(cfg.recipes.dir)
        print(Path(report["report"]).read_text(encoding="utf-8"))
        _print_summary("recipes report", report, f"report: {report['report']}   plot: {report['plot']}")
        return 0
    if not names:
        raise ConfigError(None, "vla-dist recipes run needs at least one recipe name, e.g. `vla-dist recipes run "
                          "perception-jitter`")
    from vla_dist.recipes.run import run_recipes

    report = run_recipes(names, overrides)
    print(Path(report["report"]).read_text(encoding="utf-8"))
    _print_summary("recipes run", report, f"report: {report['report']}   plot: {report['plot']}")
    return 0


def _print_summary(command: str, report: Report, where: str, outcome: str = "done") -> None:
    stop_command_ray()  # the summary is the last thing printed: no actor log line after it
    scalars = [f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in report.items()
               if isinstance(v, (str, int, float, bool))]
    print(f"{command} {outcome}: {', '.join(scalars)}")
    print(where)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # parse_known_args: argparse stops filling KEY=VALUE after an option (`a=1 --config f b=2`
        # leaves b=2 over); those leftovers are overrides too, in the order given.
        args, leftovers = parser.parse_known_args(argv)
        unknown_options = [arg for arg in leftovers if arg.startswith("-")]
        if unknown_options:
            parser.error(f"unrecognized arguments: {' '.join(unknown_options)}")
        args.overrides = [*args.overrides, *leftovers]
    except SystemExit as exit_:  # --help/--version (0) or a usage error (2); argparse has printed
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    try:
        return _run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except VlaDistError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if args.debug:
            raise
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        print("hint: rerun with --debug for the traceback", file=sys.stderr)
        return 1
