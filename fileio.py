"""Writing files so that a reader never sees half of one, and checking a folder before work starts."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from config import UsageError


def ensure_writable_dir(path: str, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written there, before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {what} {path!r}: {err.strerror or err}; choose another {what}") from None


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers never see a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
