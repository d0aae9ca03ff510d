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


def os_error_line(e: OSError) -> str:
    """One line for a file-system error: the path, what the system said, and the fix."""
    import errno

    hints = {
        errno.ENOSPC: "the disk is full: free some space or choose another -o",
        errno.EDQUOT: "the disk quota is full: free some space or choose another -o",
        errno.EROFS: "the file system is read-only: choose a writable -o",
        errno.EACCES: "permission denied: choose a folder you can write (or read), or fix its permissions",
        errno.EPERM: "operation not permitted: choose another folder, or fix its permissions",
        errno.ENOENT: "no such file (a dangling symlink, as in a broken HF cache? re-download the model)",
        errno.EISDIR: "that is a folder: name a file",
        errno.ENOTDIR: "a part of that path is a file, not a folder",
        errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
        errno.EIO: "an I/O error: the disk or the network file system failed; check it and retry",
    }
    path = e.filename if e.filename is not None else ""
    what = e.strerror or type(e).__name__
    fix = hints.get(e.errno, "check the path and retry")
    return f"{path}: {what} ({fix})" if path else f"{what} ({fix})"
