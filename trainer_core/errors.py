"""User-facing errors.

Every failure a user can cause (a typo in a config, a broken image, a missing caption) raises a
subclass of :class:`TunerError` whose message names the file or option at fault and whose
``hint`` says how to fix it. The worker turns these into ``error`` events; ComfyUI nodes show
them in the node's error dialog. Anything else that escapes is a bug in this package.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base class of every error a user can fix themselves."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nHow to fix: {self.hint}"
        return self.message


class ConfigError(TunerError):
    """An option has an invalid value, or options contradict each other."""


class UnknownFlavourError(ConfigError):
    """``model_flavour`` is not one the family knows."""


class DatasetError(TunerError):
    """The dataset cannot be trained on. ``problems`` lists every offending file at once."""

    def __init__(self, problems: list[str], hint: str | None = None) -> None:
        self.problems = list(problems)
        shown = self.problems[:50]
        more = len(self.problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown)
        if more:
            lines += f"\n  ... and {more} more"
        super().__init__(f"The dataset has {len(self.problems)} problem(s):\n{lines}", hint)


class ModelLoadError(TunerError):
    """The model weights could not be found or loaded."""


class CheckpointError(TunerError):
    """A checkpoint to resume from is missing or unusable."""


class CancelledError(TunerError):
    """Training was cancelled by the user; a checkpoint was written if possible."""
