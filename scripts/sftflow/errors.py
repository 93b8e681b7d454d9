"""The one exception type for errors a user can cause (bad config, bad input file)."""


class SftflowError(Exception):
    """A user-facing error: its message names the file, line or config key and how to fix it."""
