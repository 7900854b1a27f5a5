"""What a user sees around the work: library noise silenced (and only noise), a line before each
long silent compile, the Ray a command started stopped before its summary, quickstart summaries that
keep a kept stage's time, and where `cluster render slurm` writes. No Ray, Genesis or DeepSpeed runs."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from vla_dist import runtime


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """quiet_process, with the environment it sets restored after the test."""
    for key in [*runtime.QUIET_ENV, "RAY_COLOR_PREFIX"]:
        monkeypatch.setenv(key, "sentinel")
        monkeypatch.delenv(key)
    runtime.quiet_process()


def test_only_the_listed_deprecations_are_silenced(quiet: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.quiet_process()  # catch_warnings reset the filters: install them again inside
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use x", FutureWarning,
                      stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("`frobnicate` is deprecated", FutureWarning, stacklevel=1)  # not ours to hide
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "`frobnicate` is deprecated"),
        (UserWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
    ]


def test_library_log_noise_is_dropped_and_real_warnings_kept(quiet: None) -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(handler)
    try:
        runtime.quiet_process()  # idempotent: one filter per pattern however often it runs
        assert sum(isinstance(f, runtime._DropMatching) for f in logger.filters) == 1
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("ZeRO stage 3 with offload: 12 GB pinned")
    finally:
        logger.removeHandler(handler)
    assert records == ["ZeRO stage 3 with offload: 12 GB pinned"]


def test_quiet_environment_keeps_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QD_LOG_LEVEL", "debug")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert runtime.quiet_env() == {"QD_LOG_LEVEL": "debug", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_captured_output_shows_it_only_on_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with runtime.captured_output():
        print("Processing zero checkpoint 'x'")
        print("Loading checkpoint shards: 100%", file=sys.stderr)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="bad shard"), runtime.captured_output():
        print("Parsing checkpoint created by deepspeed==0.19.8")
        raise ValueError("bad shard")
    assert "Parsing checkpoint created by" in capsys.readouterr().err


class FakeRay:
    def __init__(self, up: bool) -> None:
        self.up, self.shutdowns = up, 0

    def is_initialized(self) -> bool:
        return self.up

    def shutdown(self) -> None:
        self.up, self.shutdowns = False, self.shutdowns + 1


@pytest.mark.parametrize("up_before", [False, True])
def test_a_command_stops_only_the_ray_it_started(monkeypatch: pytest.MonkeyPatch, up_before: bool) -> None:
    """A Ray already up (a test session's, a notebook's) is left alone; one the command started is
    shut down before the summary, so no actor line lands after it. Library use (no command) never stops."""
    fake = FakeRay(up_before)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(runtime, "quiet_process", lambda: None)
    runtime.start_command()
    fake.up = True  # the command's init_ray
    runtime.stop_command_ray()
    assert fake.shutdowns == (0 if up_before else 1)
    runtime.stop_command_ray()  # a second call (quickstart, then the CLI's summary) does nothing
    fake.up = True
    runtime.stop_command_ray()
    assert fake.shutdowns == (0 if up_before else 1)


def test_compile_announcements_say_where_the_cache_is_and_whether_it_is_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    kernels = tmp_path / "xdg" / "quadrants" / "qdcache"
    lines: list[str] = []
    monkeypatch.setattr(runtime, "_announced", set())
    runtime.announce_sim_build(compile_decoder=True, log=lines.append)
    runtime.announce_sim_build(compile_decoder=True, log=lines.append)  # once per process
    assert len(lines) == 2
    assert lines[0].startswith("Genesis: compiling its physics kernels into") and str(kernels) in lines[0]
    assert "once per machine" in lines[0]
    assert lines[1].startswith("torch.compile: each sim actor compiles") and str(tmp_path / "inductor") in lines[1]
    (kernels / "kernel_compilation_manager").mkdir(parents=True)
    (kernels / "kernel_compilation_manager" / "ticket.tcb").write_text("x")
    monkeypatch.setattr(runtime, "_announced", set())
    lines.clear()
    runtime.announce_sim_build(log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"Genesis: loading its physics kernels, cached in {kernels}")


def _cfg(run_dir: Path, *extra: str):
    from vla_dist.config import load_config, validate

    return validate(load_config(None, [f"run.dir={run_dir}", *extra]))


def test_a_kept_stage_keeps_the_time_it_took(tmp_path: Path) -> None:
    """A re-run keeps finished stages: the summary counts the time each took when it ran (from its
    own report) and marks it kept, rather than the 0 s of finding its report."""
    from vla_dist.quickstart import Stage, _markdown, _summarize
    from vla_dist.stages import run_stage

    logged: list[str] = []
    eval_dir, train_dir = tmp_path / "eval-full", tmp_path / "train-full"
    eval_dir.mkdir()
    train_dir.mkdir()
    (eval_dir / "report.json").write_text(json.dumps({"command": "eval", "wall_seconds": 61.37}))
    (train_dir / "report.json").write_text(json.dumps({"command": "train", "steps": 300, "last_step": 300,
                                                       "wall_s": 95.21}))
    _, seconds = run_stage("eval", _cfg(eval_dir), logged.append)
    assert seconds == pytest.approx(61.37)
    _, seconds = run_stage("train", _cfg(train_dir, "train.steps=300"), logged.append)
    assert seconds == pytest.approx(95.21)
    assert all("exists: keeping it" in line for line in logged) and len(logged) == 2

    row = {"episodes": 4, "successes": 1, "success_rate": 0.25, "ci95": [0.05, 0.7], "per_task": {}}
    training = {"steps": 300, "first_loss": 1.2, "final_loss": 0.3, "trainable_parameters": 387_872,
                "parameters": 548_448}
    stages = [Stage("eval-full", "eval", (), "full fine-tune"), Stage("train-full", "train", ()),
              Stage("train-lora", "train", ())]
    summary = _summarize(stages, {"eval-full": row, "train-full": training,
                                  "train-lora": {**training, "trainable_parameters": 35_000}},
                         {"eval-full": 61.4, "train-full": 95.2, "train-lora": 80.0}, 3.0, 12, kept=["eval-full"])
    assert summary["stage_seconds"]["eval-full"] == 61.4 and summary["kept_stages"] == ["eval-full"]
    text = _markdown(summary)
    assert "eval-full 61 (kept from an earlier run)" in text and "train-full 95," in text
    # the full fine-tune's frozen share is said, with why
    assert "387,872 / 548,448 (71%)" in text and "leaves 160,576 parameters (29%) frozen on purpose" in text


def test_render_slurm_names_the_quickstart_run_dir_it_would_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vla_dist.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "render", "slurm", "--job", "collect"]) == 0
    out = capsys.readouterr().out
    assert "submit: sbatch runs/quickstart/slurm/vla-dist.sbatch" in out  # RUN_DIR/slurm, as documented
    assert "note: run.dir is the quickstart's default (runs/quickstart)" in out
    assert main(["cluster", "render", "slurm", "--job", "collect", "run.dir=runs/mine"]) == 0
    out = capsys.readouterr().out
    assert "submit: sbatch runs/mine/slurm/vla-dist.sbatch" in out and "note:" not in out


def test_init_ray_quiets_every_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's runtime_env carries the quiet environment and names quiet_process as every worker's
    set-up hook (importable by that name)."""
    import importlib

    for key in [*runtime.cache_env(tmp_path), *runtime.QUIET_ENV, "RAY_COLOR_PREFIX", "RAY_AUTH_MODE"]:
        monkeypatch.setenv(key, "sentinel")
        monkeypatch.delenv(key)
    calls: list[dict] = []
    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "ray", fake)
    runtime.init_ray(None, 1, str(tmp_path))
    (kwargs,) = calls
    hook = kwargs["runtime_env"]["worker_process_setup_hook"]
    module, _, name = hook.rpartition(".")
    assert getattr(importlib.import_module(module), name) is runtime.quiet_process
    assert kwargs["runtime_env"]["env_vars"]["QD_LOG_LEVEL"] == "warn"
    assert kwargs["runtime_env"]["env_vars"]["XDG_CACHE_HOME"] == str(tmp_path.resolve() / "xdg")
    assert kwargs["dashboard_host"] == "127.0.0.1" and not kwargs["include_dashboard"]
    assert "RAY_AUTH_MODE" not in os.environ  # Ray's own default (token auth on) decides


def test_ray_saying_token_auth_is_on_is_dropped_but_not_that_it_is_off(quiet: None) -> None:
    from ray._private.authentication import authentication_token_setup as auth

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    auth.logger.addHandler(handler)
    try:
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(handler)
    assert len(records) == 1 and records[0].startswith("Token authentication is disabled")
