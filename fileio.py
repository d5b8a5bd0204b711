"""Files that survive crashes: durable atomic writes, the temp files a killed writer leaves, one writer per run.

* :func:`atomic_write` writes a temp file beside the target, syncs it to disk and renames it over the
  target, so a reader (or a restart after a crash or a power loss) sees the old file or the new one,
  never half of one.
* :func:`remove_stale_temps` removes the temp files of a writer killed before its rename.
* :func:`exclusive` holds a lock file naming its holder, so that two runs never write the same files.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import socket
import sys
import tempfile
from typing import Callable, Iterable, Iterator

from config import UsageError
from stopping import RunFailed

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the holder's pid decides
    fcntl = None  # type: ignore[assignment]

TEMP_PREFIX = ".tmp-"


def ensure_writable_dir(path: str, what: str) -> None:
    """Create ``path`` if needed and prove a file can be written there, before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {what} {path!r}: {err.strerror or err}; choose another {what}") from None


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, sync the temp file to disk, rename it over ``path``, sync the folder.

    Killed at any moment, this leaves ``path`` old or new, never half-written or (after a power loss)
    empty. An ``OSError`` (disk full, permission lost) becomes a one-line :class:`RunFailed` naming
    ``path``; the temp file is removed and ``path`` is left as it was.
    """
    directory, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{stem}-{secrets.token_hex(6)}{ext}")
    try:
        # created by the OS with mode 0o666 less the umask, as any new file is (the umask is not read)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        _sync(tmp)
        os.replace(tmp, path)
        _sync(directory)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise RunFailed(f"cannot write {path!r}: {err.strerror or err}") from None
        raise


def _sync(path: str) -> None:
    """``fsync`` a file or a folder; a folder the OS cannot open or sync (Windows, some file systems) is skipped."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not folder or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temps(targets: Iterable[str]) -> list[str]:
    """Remove the temp files :func:`atomic_write` left beside ``targets`` when killed before its rename.

    A ``*`` in a target's file name matches anything (``samples_epoch*_500_32.png``). Only the caller
    may write these targets (it holds their :func:`exclusive` lock), so no temp file of a live writer is
    touched. Returns the paths removed.
    """
    removed = []
    for target in targets:
        directory, name = os.path.split(os.path.abspath(target))
        stem, ext = os.path.splitext(name)
        for stale in glob.glob(os.path.join(glob.escape(directory), f"{TEMP_PREFIX}{stem}-*{ext}")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
                removed.append(stale)
    return removed


@contextlib.contextmanager
def exclusive(path: str, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (it names its holder: ``pid host``) while the block runs.

    Another live holder is a :class:`UsageError`. The lock is an ``flock``, which the OS drops however its
    holder ends (``kill -9`` included); a file left by a holder that is gone is taken over with a note.
    """
    fd, holder = _open_lock(path, what)
    try:
        if holder:
            print(f"note: taking over the lock {path!r} of process {holder}, which is no longer running",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


def _open_lock(path: str, what: str) -> tuple[int, str]:
    """An open, locked descriptor of the lock file, and the holder a dead run left in it ("" if none)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        holder = os.read(fd, 200).decode(errors="replace").strip()
        if _held_by_another(fd, holder):
            os.close(fd)
            raise UsageError(f"{what} is being trained by process {holder or '?'} (lock {path!r}); wait for it "
                             "to end, or choose another --out-dir")
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, holder
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file while we opened it: try the new one


def _held_by_another(fd: int, holder: str) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
    pid, _, host = holder.partition(" ")
    if not pid.isdigit() or host != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
