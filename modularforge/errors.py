"""Exceptions for user mistakes and bad inputs.

Library code raises these; only `cli.main` turns them into a one-line message and an exit code.
Invariants inside the code use `assert`.
"""


class ModularForgeError(Exception):
    """Base class: anything the user can fix (input, config, files on disk)."""


class ConfigError(ModularForgeError):
    """The configuration is invalid: names the key and the fix."""


class DataError(ModularForgeError):
    """Input text or prepared data is missing, unreadable or unusable."""


class TrainingError(ModularForgeError):
    """Training cannot continue (a non-finite loss, an incompatible checkpoint)."""


class AssemblyError(ModularForgeError):
    """An input to assembly is missing, corrupted or incompatible; nothing was written."""


class StageOrderError(ModularForgeError):
    """A stage was asked to run before the stage whose files it reads."""
