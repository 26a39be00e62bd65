"""The one exception type users see: a one-line message naming the file or key and the problem."""


class SpkdistError(Exception):
    """A problem with the user's input (data, config, paths), reported as one line without a traceback."""
