"""User-facing errors.

Anything a user can cause (a missing file, a corrupt image, a bad checkpoint layout, a placeholder count
that does not match the inputs) raises `InputError` with one line that names the input and says what to
do. The CLI prints that line and exits non-zero; library callers can catch it.
"""


class HyperowlError(Exception):
    """Base class of errors caused by user input or the environment, not by a bug."""


class InputError(HyperowlError, ValueError):
    """Bad user input: a file, an image, a video, a message, an argument."""


class CheckpointError(HyperowlError):
    """A checkpoint that cannot be loaded: unknown layout, missing or unknown keys, pickle only."""
