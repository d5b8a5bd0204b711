"""How a run ends before its end: a signal becomes a request to stop between steps, and the
exceptions that end a run with their own exit status (``cli.run_cli`` prints them as one line).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


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


class StopRequests:
    """While active, SIGINT (Ctrl-C) and SIGTERM only record that a stop was asked for, in ``signum``.

    The training loop looks at ``signum`` between steps. A second signal (Ctrl-C pressed again while the
    checkpoint is written) is recorded the same way, so it cannot cut the write short. Only the main
    thread can catch signals; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
