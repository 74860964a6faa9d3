"""Errors a user can fix: reported as one line and exit code 2, never as a traceback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConfigError(Exception):
    """A mistake in the user's input.

    `file`, `line` and `key` locate it; `fix` tells the user what to do. `str()` gives the one line
    the CLI prints.
    """

    message: str
    file: str | None = None
    line: int | None = None
    key: str | None = None
    fix: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        parts = [p for p in (where, self.key) if p]
        head = ": ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.fix:
            text += f" ({self.fix})"
        return text

    def located(self, file: str | None = None, line: int | None = None, key: str | None = None) -> ConfigError:
        """The same error with missing location fields filled in."""
        return ConfigError(
            self.message,
            file=self.file or file,
            line=self.line or line,
            key=self.key or key,
            fix=self.fix,
        )


class TrainingError(Exception):
    """A failure inside training (exit code 1)."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
