"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class MetaVQAError(Exception):
    """Bad input from the user (a file, a task, a config key). Printed without a traceback."""


class DataError(MetaVQAError):
    """A dataset file is malformed or inconsistent with the others."""


class ConfigError(MetaVQAError):
    """A configuration value is invalid or inconsistent."""


class TrainingDiverged(MetaVQAError):
    """A loss or gradient became NaN or infinite; training stopped before the step was applied."""
