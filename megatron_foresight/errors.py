"""Errors that are the user's to fix: the command line prints their message (no traceback) and
exits with status 2. Anything else is a bug and keeps its traceback."""


class UsageError(Exception):
    """Bad input that is not a recipe key (recipes raise `configtree.ConfigError`): a file, a
    checkpoint, a run directory. The message names the thing and says what to do."""


class UntrustedCheckpointError(UsageError):
    """A checkpoint file whose pickle asks for something a checkpoint never needs (a function to
    call, a class to build): it may be crafted to run code when loaded, and was refused
    (see `runtime/untrusted.py`). Built from its message alone, so it pickles: torch hands a
    rank's failure to the other ranks that way."""
