"""Errors that the command line turns into a clear message and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (missing data, wrong path, corrupt checkpoint...); the message says what to do."""


class DataError(UserError):
    """The dataset folder or the shards are missing, malformed or mostly unreadable."""


class CheckpointError(UserError):
    """A checkpoint file is missing, corrupt or not a cxr-dist checkpoint."""
