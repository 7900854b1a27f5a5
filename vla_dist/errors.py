"""The project's error types. The CLI maps each to an exit code: ConfigError -> 2, VlaDistError -> 1.

Kept free of imports so any module (config loading, Ray actors, the CLI) can raise them cheaply.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A bad config or usage: unknown key, wrong type, value out of range, missing file, bad override.

    `key` is the full dotted path of the offending key (e.g. "collect.episodes"), or None when the
    problem is a whole file or an override's syntax. `problem` says what the bad value was and what
    is allowed; str(error) puts the key in front so every message names it.
    """

    def __init__(self, key: str | None, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class VlaDistError(RuntimeError):
    """A runtime failure (not the user's config): the message says what failed and what was kept."""


def error_line(error: BaseException, limit: int = 400) -> str:
    """What went wrong, in one line (at most `limit` characters), to go into a longer message.

    - An exception raised inside a Ray task arrives wrapped (RayTaskError: its text is the remote
      traceback, whose first line only names the task): its `cause`, named by type.
    - A Ray actor's death (RayActorError): its last line, which says why (the first one is always
      "The actor died unexpectedly before finishing this task."), named by type.
    - Anything else: the first non-empty line of its text (OmegaConf, YAML and HTTP errors put the
      message first and details after), or its type's name when it has no text.
    """
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return f"{type(cause).__name__}: {error_line(cause, limit)}"[:limit]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(cls.__name__ == "RayActorError" for cls in type(error).__mro__):  # by name: no Ray import here
        return f"{type(error).__name__}: {lines[-1]}"[:limit]
    return lines[0][:limit]
