"""Errors that are the user's to fix: the command line prints their message (no traceback) and
exits with status 2. Anything else is a bug and keeps its traceback."""


class UsageError(Exception):
    """Bad input that is not a recipe key (recipes raise `configtree.ConfigError`): a file, a
    checkpoint, a run directory. The message names the thing and says what to do."""
