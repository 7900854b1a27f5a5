"""Process-level setup shared by the driver and every Ray actor: compile caches, quiet libraries
and Ray start-up.

Genesis compiles its physics kernels (minutes, cold), inductor its graphs and DeepSpeed its comm
ops; all of them cache on disk. Pointing every process (Ray actors included, through `runtime_env`)
at one cache directory means each is compiled once per machine, not once per actor.

The libraries also print a lot that tells a vla-dist user nothing (progress bars of loading a
0.5M-parameter model, a kernel compiler announcing it found a wrapped stdout, deprecations inside
DeepSpeed and transformers). `quiet_process` silences exactly those, here: the CLI runs it first,
and every Ray worker at start-up (`worker_process_setup_hook`); errors, real warnings and our own
progress lines are kept.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "vla-dist"

# Environment that quiets libraries at import, in this process and (through the job's runtime_env)
# in every Ray worker. A value the user set wins.
QUIET_ENV = {
    # quadrants, Genesis' kernel compiler, logs "Graphical python shell detected, using wrapped
    # sys.stdout" at info level in every process whose stdout is not the console: every Ray actor
    "QD_LOG_LEVEL": "warn",
    # transformers' "Loading weights" / "Writing model shards" bars (huggingface_hub's switch, read
    # at import; transformers follows it)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

# Deprecation warnings raised inside libraries, about calls they make (nothing a user can change).
DEPRECATIONS: tuple[tuple[type[Warning], str], ...] = (
    # DeepSpeed ZeRO's collectives (torch 2.13 renamed them)
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # peft asks transformers' old name for is_activation_checkpointing
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # transformers' own PI0/PaliGemma/LLaVA forward passes hand each other `past_key_values`
    (FutureWarning, r"`past_key_values` is deprecated and will be removed"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
)

# Log records that carry no information for our user, by logger: (logger name, message regex).
LOG_NOISE: tuple[tuple[str, str], ...] = (
    # DeepSpeed at import on a machine without a GPU, and its accelerator choice on one with
    ("DeepSpeed", r"Setting (ds_)?accelerator to "),
    # the same transformers deprecation as above, as a log line
    ("transformers.utils.generic", r"`past_key_values`/`cache_params` are deprecated"),
    # Ray 2.60 at every start of a local cluster: token authentication is on (its default, kept: the
    # warning that it is *off* still shows). Setting RAY_AUTH_MODE=token instead would have to happen
    # before Ray reads its config at import, which a library cannot promise.
    ("ray._private.authentication.authentication_token_setup", r"^Token authentication is enabled for this Ray"),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_env() -> dict[str, str]:
    """QUIET_ENV with the values already set in this process kept."""
    return {key: os.environ.get(key, value) for key, value in QUIET_ENV.items()}


def quiet_process() -> None:
    """Silence the library noise listed above in this process (idempotent). The CLI calls it before
    importing anything heavy; Ray workers run it at start-up (`init_ray` names it as the job's
    `worker_process_setup_hook`)."""
    os.environ.update(quiet_env())
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        # Ray wraps each forwarded actor line's "(Name pid=N)" prefix in colour codes even into a file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for category, message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in LOG_NOISE:
        logger = logging.getLogger(name)  # the library's own logger, created now or later, keeps the filter
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    if "transformers" in sys.modules:  # imported before the variable was set: tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


@contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Capture what library code prints to stdout/stderr (DeepSpeed's checkpoint consolidation, its
    comm-op loader); shown on stderr only if the code raises, so a failure keeps its context."""
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer), redirect_stderr(buffer):
            yield buffer
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def cache_env(cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """Environment variables that send every compile cache under `cache_dir`."""
    root = Path(cache_dir or os.environ.get("VLA_DIST_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser().resolve()
    return {
        "VLA_DIST_CACHE_DIR": str(root),
        "XDG_CACHE_HOME": str(root / "xdg"),  # Genesis assets and quadrants kernel cache (qdcache)
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
    }


def apply_cache_env(cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """Set the cache variables in this process (before Genesis/torch compile anything)."""
    env = cache_env(cache_dir)
    os.environ.update(env)
    return env


def init_ray(address: str | None, num_cpus: int | None, cache_dir: str | None) -> dict[str, str]:
    """Join the configured Ray cluster, or start one in this process when `address` is null.

    Every worker inherits the compile-cache variables and the quiet set-up through the job's
    `runtime_env`. The dashboard is never exposed beyond this host: disabled for an in-process Ray
    (nothing to look at that the progress bar does not show); a cluster's own dashboard is set up
    by `cluster/`. Returns the cache environment that was applied.
    """
    import ray

    env = apply_cache_env(cache_dir)
    if ray.is_initialized():
        return env
    quiet_process()
    runtime_env = {"env_vars": {**env, **quiet_env()}, "worker_process_setup_hook": "vla_dist.runtime.quiet_process"}
    if address is None:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            logging_level="warning",
            log_to_driver=True,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env, logging_level="warning")
    return env


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


_ray_up_before_command: bool | None = None  # None: no command started (library use, tests)


def start_command() -> None:
    """The CLI, before a command runs: quiet this process and note whether Ray is already up, so
    `stop_command_ray` stops only a Ray this command started."""
    global _ray_up_before_command
    quiet_process()
    _ray_up_before_command = ray_running()


def stop_command_ray() -> None:
    """Before a command prints its summary: shut down the Ray it started. Ray forwards actors' output
    asynchronously (and an actor's buffered stdout only when it exits), so without this their last
    lines land after the summary; shutting down stops the forwarding first."""
    global _ray_up_before_command
    if _ray_up_before_command is False and ray_running():
        import ray

        ray.shutdown()
    _ray_up_before_command = None


# ---------------------------------------------------------------- compiles the user waits for

_announced: set[str] = set()


def cache_root() -> Path:
    return Path(os.environ.get("VLA_DIST_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def announce_sim_build(compile_decoder: bool = False, log: Callable[[str], None] | None = None) -> None:
    """One line, before sim actors start, for each long silent compile they are about to do: Genesis'
    physics kernels (minutes on a cold cache) and, with model.compile, the torch.compile'd decoder.
    Once per process (a quickstart builds actors in five stages)."""
    log = log or (lambda line: print(line, flush=True))
    if "genesis" not in _announced:
        _announced.add("genesis")
        kernels = Path(os.environ.get("XDG_CACHE_HOME") or cache_root() / "xdg") / "quadrants" / "qdcache"
        compiled = kernels / "kernel_compilation_manager"
        if compiled.is_dir() and any(compiled.iterdir()):
            log(f"Genesis: loading its physics kernels, cached in {kernels} (a scene shape not built "
                "before still compiles part of them, about a minute)")
        else:
            log(f"Genesis: compiling its physics kernels into {kernels}, several minutes with no output; "
                "once per machine (later runs load them in seconds)")
    if compile_decoder:
        announce_decoder_compile("each sim actor compiles the action decoder on its first batch", log)


def announce_decoder_compile(what: str, log: Callable[[str], None] | None = None) -> None:
    """One line before torch.compile'd action decoding compiles (minutes on a cold cache); once per process."""
    if "decoder" in _announced:
        return
    _announced.add("decoder")
    log = log or (lambda line: print(line, flush=True))
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_root() / "inductor"
    log(f"torch.compile: {what}, minutes on a cold cache with no output; once per model shape and batch "
        f"size (cached in {inductor}, later runs reuse it)")
