"""Files that survive crashes: :func:`atomic_write` (a temp file, synced and renamed over the target, so a reader
sees the old file or the new one, never half), :func:`remove_stale_temps` (what a killed writer left) and
:func:`exclusive` (a lock naming its holder, so that two runs never write the same files).
"""

import contextlib
import errno
import glob
import os
import secrets
import socket
import sys
import tempfile
from typing import Callable, Iterable, Iterator

from lib.errors import UsageError
from lib.errors import RunFailed

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
    """Call ``write(tmp)``, sync it, rename it over ``path``, sync the folder: ``path`` is old or new, never half;
    an ``OSError`` becomes a one-line ``RunFailed`` with ``path`` untouched."""
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
    """Remove the temp files a killed :func:`atomic_write` left beside ``targets`` (``*`` matches anything)."""
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
    """Hold the lock ``path`` (an ``flock`` naming its holder) for the block; another live holder is a
    ``UsageError``, a dead one's file is taken over with a note."""
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
    pid, _, host = holder.partition(" ")  # no flock (Windows): a holder of this host is alive while its pid is
    if not pid.isdigit() or host != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it is alive, another user's
        pass
    return True


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
