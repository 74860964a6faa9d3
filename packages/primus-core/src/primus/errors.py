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
        import unicodedata

        def one_line(value: object) -> str:
            # A newline or terminal escape inside a value (a key, a file name, a value quoted in the
            # message) must not forge output lines or drive the terminal: control and format
            # characters (newline, tab, ESC, NUL, bidi overrides, lone surrogates from undecodable
            # file names) and Unicode line separators print as escapes (`\n`, `\x1b`, `\u202e`);
            # other text, accented or not Latin, is kept.
            def escape(char: str) -> str:
                category = unicodedata.category(char)
                if category[0] == "C" or category in ("Zl", "Zp"):
                    return char.encode("unicode_escape", "backslashreplace").decode("ascii")
                return char

            return "".join(escape(char) for char in str(value)) if value is not None else ""

        where = ""
        if self.file:
            where = one_line(self.file) + (f":{one_line(self.line)}" if self.line else "")
        parts = [p for p in (where, one_line(self.key)) if p]
        head = ": ".join(parts)
        message = one_line(self.message)
        text = f"{head}: {message}" if head else message
        if self.fix:
            text += f" ({one_line(self.fix)})"
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
