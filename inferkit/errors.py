"""The one user-facing error type."""


class InferkitError(Exception):
    """A mistake the user can fix: printed once by the CLI, without a traceback."""
