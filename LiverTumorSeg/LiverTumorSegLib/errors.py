"""Errors whose message is meant for the user: the CLI prints it alone, without a traceback."""


class LiverTumorSegError(Exception):
    """Base class: a clear, user-facing message."""


class InputError(LiverTumorSegError):
    """The input image is not something we can segment (not a CT, 2-D, 4-D, NaN, ...)."""


class ModelFileError(LiverTumorSegError):
    """A model file is missing, truncated, corrupt or does not match its card."""


class OutputError(LiverTumorSegError):
    """An output would overwrite an existing file, or cannot be written."""


class Cancelled(LiverTumorSegError):
    """The user cancelled a running job."""
