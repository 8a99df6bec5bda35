"""The one error type a user sees: one line naming the file, the key and what is allowed."""


class RecipeError(Exception):
    """A recipe (or its overrides) cannot run. The CLI prints it on one line and exits 2."""

    def __init__(self, source: str, key: str | None, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")
