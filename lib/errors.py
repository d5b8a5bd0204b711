"""The project's errors: each is reported by ``lib.cli.run_cli`` as one line, with its own exit status."""


class UsageError(Exception):
    """Bad input: one line on stderr and exit status 2, never a traceback."""


class RunStopped(Exception):
    """The run ended early; ``str(self)`` is the one line to print and ``status`` the exit status."""

    status = 1


class RunFailed(RunStopped):
    """A failure of the run, not of the command line (training diverged, a write failed): exit status 1."""


class Interrupted(RunStopped):
    """Stopped by a signal after saving its work: exit status 128 + the signal's number (SIGINT 130, SIGTERM 143)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.status = 128 + signum
