"""The one exception type for errors a user can fix."""


class EdgequantError(Exception):
    """An error the user can fix; the message names the fix.

    The CLI prints it as one line and exits with a non-zero status. Anything
    else that escapes is a bug and keeps its traceback.
    """


class GateFailed(EdgequantError):
    """A release gate failed (template mismatch, or a quality threshold): exit status 3, not 2,
    so that CI can tell "the inputs were wrong" from "the result is not good enough"."""

    exit_code = 3
