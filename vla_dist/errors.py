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
