"""Errors for bad input. The CLI prints their message as one line and exits 2.

Raise them with a message that names the config key, file or argument at fault
and what would be accepted instead; never let bad input surface as a traceback
from deep inside torch or numpy.
"""


class MegamixError(Exception):
    """Base class: a user-facing error with a self-explanatory message."""


class ConfigError(MegamixError):
    """A config key, value or combination of values is not allowed."""


class DataError(MegamixError):
    """An input text file, token file or tokenizer is missing or malformed."""


class CheckpointError(MegamixError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


class TrainingError(MegamixError):
    """Training cannot go on (e.g. the loss became NaN)."""
