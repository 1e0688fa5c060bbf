"""Writing into a run folder safely: one process per folder, atomic files, nothing finished overwritten.

Not the paper: the machinery every command that writes (train.py, evaluate.py, ``features.py stats``,
``tools.progress``, ``tools.experiments``) shares; docs/safety.md gives the rules.

* :func:`claim`: an OS file lock (``fcntl.flock``) on ``FOLDER/.piad.lock``, taken before any work.
  It dies with its process (a SIGKILLed run leaves no stale lock: the folder is usable at once); a
  second process gets :class:`Busy`, one ``error:`` line naming the holder's PID. Taking it also
  proves the folder writable before any data loads. Within one process a claim is re-entrant for
  the same thread (train.py evaluates into the folder it holds).
* :func:`atomic_write`: a temporary file beside the target, flushed to disk, then renamed onto it;
  the temporary is removed on any failure (a full disk included), which is reported as
  :class:`WriteFailed` (one ``error:`` line) naming the file. With ``overwrite=False`` an existing
  target is never replaced (:class:`Exists`; race-free: a hard link, which fails if it exists).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import tempfile
import threading
from pathlib import Path

import errors

LOCK = ".piad.lock"


class Busy(errors.UserError):
    """Another process (or thread) is writing into the folder."""


class Exists(errors.UserError, FileExistsError):
    """The output file exists and is not replaced without ``--overwrite``."""


class WriteFailed(errors.UserError, OSError):
    """A file could not be written (unwritable location, full disk); nothing was left half-written."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return errors._first_line(exc)


_held: dict[str, "Claim"] = {}  # folders this process holds: resolved path -> its claim
_held_guard = threading.Lock()


class Claim:
    """The lock of one folder (:func:`claim`); released by :meth:`release`, ``with``, or the
    process's end. Releasing removes the lock file, and the folder when the claim created it and
    nothing else was written there."""

    def __init__(self, folder: Path, fd: int, created: bool):
        self.folder, self.fd, self.created = folder, fd, created
        self.thread, self.depth, self.pid = threading.get_ident(), 1, os.getpid()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        with _held_guard:
            self.depth -= 1
            if self.depth > 0 or self.fd < 0 or self.pid != os.getpid():  # a forked child owns nothing
                return
            _held.pop(str(self.folder.resolve()), None)
            with contextlib.suppress(OSError):
                (self.folder / LOCK).unlink()  # still locked while unlinked: no one can hold a stale inode
            os.close(self.fd)
            self.fd = -1
            if self.created:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # only if empty: a run that did no work leaves nothing behind


@atexit.register
def _release_all() -> None:  # a process that ends without releasing (an error line, a signal): no lock file left
    for held in list(_held.values()):
        held.depth = 1
        held.release()


def claim(folder, *, what: str = "--out") -> Claim:
    """Takes ``folder``'s lock (creating the folder); raises :class:`Busy` naming the holder's PID if
    another process holds it, :class:`WriteFailed` if the folder cannot be written."""
    folder = Path(folder)
    key = str(folder.resolve())
    with _held_guard:
        mine = _held.get(key)
        if mine is not None:
            if mine.thread != threading.get_ident():
                raise Busy(f"{what} {folder} is in use by another thread of this process (PID {os.getpid()}); "
                           "one run per folder: choose another folder")
            mine.depth += 1
            return mine
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteFailed(f"cannot write to {what} {folder}: {_reason(exc)}") from exc
        while True:
            try:
                fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise WriteFailed(f"cannot write to {what} {folder}: {_reason(exc)}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise WriteFailed(f"cannot lock {what} {folder}: {_reason(exc)}") from exc
                raise Busy(f"{what} {folder} is in use by another piad process (PID {pid}); one run per folder: "
                           "wait for it to end, or choose another folder") from None
            try:  # the file we locked may have been unlinked by a holder releasing it: lock the new one
                a, b = os.fstat(fd), os.stat(folder / LOCK)
                same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        try:  # the PID for a second process's message; also proves the disk takes a write
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
            raise WriteFailed(f"cannot write to {what} {folder}: {_reason(exc)}") from exc
        _held[key] = Claim(folder, fd, created)
        return _held[key]


def atomic_write(path, write, *, overwrite: bool = True, mode: str = "wb", flag: str = "--overwrite") -> None:
    """``write(fh)`` into a temporary file beside ``path``, flushed to disk, then renamed onto
    ``path``. ``overwrite=False``: an existing ``path`` is left as it is and :class:`Exists` raised
    (``flag``: how the user allows it). Any failure removes the temporary; a failure to write
    (``OSError``, or torch's ``RuntimeError`` from its writer) raises :class:`WriteFailed`."""
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise Exists(f"{path} exists and is not replaced; choose another file, or pass {flag} to replace it")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteFailed(f"could not write {path}: {_reason(exc)}") from exc
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never replaces it
            except FileExistsError:
                raise Exists(f"{path} exists and is not replaced; choose another file, or pass {flag} to "
                             "replace it") from None
            except OSError:  # no hard links here
                if os.path.lexists(path):
                    raise
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, errors.UserError) or not isinstance(exc, (OSError, RuntimeError)):
            raise
        raise WriteFailed(f"could not write {path}: {_reason(exc)}; nothing was left half-written") from exc


def write_text(path, text: str, **kw) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode()), **kw)
