"""The one error type the CLI shows to users: what is wrong, where, and how to fix it."""

from __future__ import annotations


class CLIError(Exception):
    """Bad user input, reported as one paragraph (never a traceback).

    Args:
        message: what is wrong.
        source: the file (or "command line") the input came from.
        key: the dotted key inside it, e.g. ``cartpole-ppo.config.lr``.
        fix: what the user should do about it.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None,
                 fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.source = source
        self.key = key
        self.fix = fix

    def __str__(self) -> str:
        where = ", ".join(
            part for part in (self.source, f"key '{self.key}'" if self.key else None) if part
        )
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        # One paragraph, even when the input itself holds line breaks.
        return text.replace("\r", "\\r").replace("\n", "\\n")
