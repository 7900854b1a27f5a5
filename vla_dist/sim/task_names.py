"""Task names, importable without Genesis (config validation runs before any simulator work)."""

TASK_NAMES: tuple[str, ...] = ("pick_cube", "push_cube", "stack_cube")
