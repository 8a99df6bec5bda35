"""The errors a user sees, each one line, each with its exit code (README: exit codes).

- ``RecipeError`` (exit 2): a recipe, its data, a checkpoint or the environment cannot run; the
  line names the file, the key (or line) and what is allowed.
- ``Diverged`` (exit 3): the run kept producing non-finite losses or gradients.
"""

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was written; requeue and resume


class RecipeError(Exception):
    """A recipe (or its overrides) cannot run. The CLI prints it on one line and exits 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, source: str, key: str | None, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


class Diverged(Exception):
    """Consecutive updates without a finite loss or gradient: the CLI prints one line and exits 3."""

    exit_code = EXIT_DIVERGED
