"""Errors that lipcert reports to the user as one clear line and a non-zero exit."""


class LipcertError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class DatasetUnavailableError(LipcertError):
    """A dataset's files or package are missing; the message says how to get them."""


class CheckpointError(LipcertError):
    """A checkpoint is corrupt, truncated, unsafe, or does not match its config."""


class TrainingError(LipcertError):
    """Training cannot go on (for example the loss became NaN)."""
