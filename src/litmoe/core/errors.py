"""The exceptions a command line turns into one line and an exit status, instead of a traceback.

Every message names what is wrong (file, key, value) and how to fix it.
"""

EXIT_USAGE = 2  # a mistake the user can fix (argparse's status)
EXIT_DIVERGED = 3  # training stopped at a non-finite loss or gradient norm; the last good checkpoint is kept
EXIT_OUT_OF_MEMORY = 4  # the GPU ran out of memory during training; the last checkpoint is kept
EXIT_CORRUPT = 65  # EX_DATAERR: --verify found a file whose bytes changed or a checkpoint that cannot load
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; run again with --resume auto
EXIT_PEER_LOST = 76  # EX_PROTOCOL: another rank died, stalled past --timeout-minutes or never joined
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away, as shells report it for Unix tools


class UserError(Exception):
    """Bad input or an impossible request; the message is shown to the user as it is."""


class RunStopped(Exception):
    """Training stopped early after saving what could be saved. `message` (None on ranks other than 0, which
    stay quiet) goes to stderr and `exit_code` becomes the process's status."""

    def __init__(self, message: str | None, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
