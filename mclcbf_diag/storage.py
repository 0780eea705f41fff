"""File safety shared by every command: atomic writes, durable appends, locks, run identity.

Mechanisms
----------
* **Atomic replace** (:func:`atomic_write`, :func:`atomic_write_text`,
  :func:`atomic_write_with`). The new content goes to a temporary file in the SAME folder
  (``.NAME.tmp-PID-RANDOM``), is flushed and ``fsync``-ed, then ``os.replace``-d over the
  target and the folder is ``fsync``-ed so the rename itself survives a power cut. A
  reader, a kill or a full disk therefore sees either the old file or the whole new one,
  never a truncated file; on failure the temporary file is removed and the error is ONE
  :class:`~mclcbf_diag.errors.UserError` line naming the file and the reason
  ("no space left on device").
* **Durable append** (:func:`append_bytes`). One ``os.write`` loop on an ``O_APPEND``
  descriptor, then ``fsync`` of the file, and of the folder when the file was just
  created. A kill leaves whole earlier appends plus at most one partial tail, which the
  reader cuts off (see :mod:`mclcbf_diag.sweep`).
* **Exclusive folders** (:class:`FolderLock`). ``fcntl.flock`` on ``.mclcbf-diag.lock``
  inside the folder; the holder writes ``pid``, host and start time into it. The kernel
  drops the lock when its holder exits or is killed, so a stale lock never blocks a
  rerun; a second live process is refused with one line naming the holder.
  :func:`check_unlocked` (called by :func:`check_writable`) probes the lock without creating
  anything, so a busy folder is refused before any model loads.
* **Identity** (:func:`sha256_file`). A file's content hash: what a resumed run compares to know it
  reads the same question file (:mod:`mclcbf_diag.fingerprints` for model files and images).
* **Names** (:func:`safe_name`, :func:`contained`). Strings that come from data (question
  ids) become file names with only ``[A-Za-z0-9._-]`` (plus a short hash when anything
  was replaced, so distinct ids never collide), and derived paths are checked to stay in
  their folder.
* **Manifests** (:func:`write_manifest`, :func:`verify_manifest`). ``MANIFEST.sha256`` in
  ``sha256sum`` format (``<hex>  <name>``) next to a model's files; ``--verify`` checks it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".mclcbf-diag.lock"
MANIFEST = "MANIFEST.sha256"


# ----------------------------------------------------------------------------- messages
def reason(exc: OSError) -> str:
    """A short, one-line reason for an OSError ("no space left on device")."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text.replace("\n", " ").strip()


def show(path) -> str:
    """``path`` as printable text, whatever bytes its name holds (non-UTF-8 names escaped)."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _write_error(path: Path, exc: OSError, fix: str) -> UserError:
    return UserError(f"cannot write {show(path)} ({reason(exc)}); {fix}")


_FIX = "free some space or pass a writable --out, then rerun the same command (nothing was half-written)"


# ----------------------------------------------------------------------------- fsync
def fsync_dir(folder: Path) -> None:
    """Make renames and new names in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- atomic replace
def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_with(path: str | Path, writer: Callable[[Path], None], *, fix: str = _FIX) -> Path:
    """Let ``writer(tmp)`` write a temporary file beside ``path``, then fsync and rename it.

    For writers that want a path (``DataFrame.to_parquet``); the parent folder must exist.

    Args:
        path: the file replaced.
        writer: ``writer(tmp)`` writes the whole file at ``tmp``.
        fix: the fix the error message ends with (the default: free space or a writable ``--out``, then rerun).

    Returns:
        ``path``.

    Raises:
        UserError: an OSError while writing, syncing or renaming (the temporary file is removed).
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _write_error(path, exc, fix) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write(path: str | Path, data: bytes, *, fix: str = _FIX) -> Path:
    """Replace ``path`` by ``data`` atomically (see the module docstring).

    Args:
        path: the file replaced.
        data: its new bytes.
        fix: the fix the error message ends with (the default: free space or a writable ``--out``, then rerun).

    Returns:
        ``path``.

    Raises:
        UserError: an OSError while writing (nothing half-written is left).
    """

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    return atomic_write_with(path, write, fix=fix)


def atomic_write_text(path: str | Path, text: str, *, fix: str = _FIX) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8 (lone surrogates written back as the bytes they stand for).

    Args:
        path: the file replaced.
        text: its new text.
        fix: the fix the error message ends with (the default: free space or a writable ``--out``, then rerun).

    Returns:
        ``path``.

    Raises:
        UserError: an OSError while writing (nothing half-written is left).
    """
    return atomic_write(path, text.encode("utf-8", "surrogateescape"), fix=fix)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- append
def append_bytes(path: str | Path, data: bytes, *, fix: str | None = None) -> None:
    """Append ``data`` with one write loop and fsync; an OSError becomes one UserError line.

    A failed append may leave a partial tail (no newline at the end), which readers drop.

    Args:
        path: the file appended to (created if missing).
        data: the bytes appended.
        fix: the fix the error message ends with; None: free space (or make it writable), then rerun to resume.

    Raises:
        UserError: an OSError while opening, writing or syncing.
    """
    path = Path(path)
    fix = fix or ("free some space (or make it writable), then rerun the same command to resume; "
                  "the answers already written are kept")
    created = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _write_error(path, exc, fix) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        raise _write_error(path, exc, fix) from None
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


# ----------------------------------------------------------------------------- folders
def check_writable(out: str | Path, flag: str = "--out") -> Path:
    """Fail early, creating nothing, when ``out`` cannot be made or written."""
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link
            raise UserError(f"{flag} {show(out)}: cannot write there ({show(existing)} is a broken link); "
                            "pass a writable folder")
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{show(existing)} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{show(existing)} is not writable"
    if problem:
        raise UserError(f"{flag} {show(out)}: cannot write there ({problem}); pass a writable folder")
    check_unlocked(out, flag)
    return out


def check_unlocked(folder: Path, what: str = "--out") -> None:
    """Refuse at once a folder whose lock another live process holds (creating nothing; see :class:`FolderLock`).

    A probe only: the command takes the lock itself when it starts writing.
    """
    import fcntl

    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return  # no lock file (or none readable): nobody can hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise _in_use(fd, folder, what) from None
    finally:
        os.close(fd)


def _in_use(fd: int, folder: Path, what: str) -> UserError:
    try:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
    except OSError:
        holder = "another process"
    return UserError(f"{what} {show(folder)} is in use by {holder}; wait for it to finish (or stop it), or pass "
                     "another --out")


def make_dir(out: str | Path, flag: str = "--out") -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as exc:
        raise UserError(f"{flag} {show(out)}: cannot write there ({reason(exc)}); pass a writable folder") from None
    return out


class FolderLock:
    """An exclusive ``flock`` on ``folder/.mclcbf-diag.lock`` (see the module docstring)."""

    def __init__(self, folder: str | Path, what: str = "--out"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.what} {show(self.folder)}: cannot create its lock file ({reason(exc)}); "
                            "pass a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = _in_use(fd, self.folder, self.what)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise busy from None
            raise UserError(f"{self.what} {show(self.folder)}: cannot lock it ({reason(exc)}); "
                            "pass a folder on a local disk") from None
        note = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode(), 0)
        except OSError:
            pass  # the lock holds even if the note cannot be written
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- identity
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(obj) -> str:
    """A short stable digest of a JSON-able object."""
    import json

    text = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- names
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text, limit: int = 80) -> str:
    """``text`` as a file-name part: safe characters only, no leading dot, bounded length.

    When anything had to change, a short hash of the original is appended so two
    different ids never map to one name (``a/b`` → ``a_b-1c3f…``, ``a_b`` stays ``a_b``).
    """
    raw = str(text)
    name = _UNSAFE.sub("_", raw).lstrip(".")[:limit] or "_"
    if name != raw:
        name = f"{name}-{hashlib.sha256(raw.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return name


def contained(folder: Path, relative: str, what: str) -> Path:
    """``folder / relative`` when ``relative`` is a plain relative path that stays inside ``folder``.

    Absolute paths and ``..`` components are refused, and so is a
    path that leaves ``folder`` once symbolic links are followed (a link inside it to a file
    elsewhere).

    Args:
        folder: the folder the path must stay in.
        relative: the path as the user gave it.
        what: names the input in the error message (it starts the message), e.g. an option.

    Returns:
        ``folder / relative``.

    Raises:
        UserError: ``relative`` is absolute, holds ``..`` or a NUL, or leads outside ``folder`` through a link.
    """
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ".." in rel.parts or "\0" in relative:
        raise UserError(f"{what} {relative!r} is not a plain relative path inside {show(folder)} "
                        "(absolute paths and '..' are refused); name the file relative to that folder")
    path = folder / rel
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise UserError(f"{what} {relative!r} is a symbolic link to {show(path.resolve())}, outside {show(folder)}; "
                        "copy the file into that folder instead of linking to it")
    return path


# ----------------------------------------------------------------------------- manifests
def write_manifest(folder: str | Path, names: Iterable[str] | None = None) -> Path:
    """Write ``folder/MANIFEST.sha256`` over ``names`` (default: every file but the manifest)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST
                       and not p.name.startswith("."))
    lines = "".join(f"{sha256_file(folder / n)}  {n}\n" for n in sorted(names))
    return atomic_write_text(folder / MANIFEST, lines)


def read_manifest(folder: str | Path) -> dict[str, str]:
    path = Path(folder) / MANIFEST
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if not m:
            raise UserError(f"{show(path)}, line {lineno}: not '<sha256>  <file name>'; regenerate it with "
                            "`sha256sum FILES > MANIFEST.sha256`")
        out[m.group(2)] = m.group(1).lower()
    return out


def verify_manifest(folder: str | Path, flag: str = "--verify") -> int:
    """Check every file listed in ``folder/MANIFEST.sha256``; returns how many were checked."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{flag}: {show(folder)} has no {MANIFEST}; create one there with "
                        f"`sha256sum *.safetensors *.json > {MANIFEST}` or drop {flag}")
    try:
        expected = read_manifest(folder)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag}: cannot read {show(folder / MANIFEST)} ({exc}); regenerate it") from None
    if not expected:
        raise UserError(f"{flag}: {show(folder / MANIFEST)} lists no files; regenerate it")
    for name, want in sorted(expected.items()):
        path = contained(folder, name, f"{flag}: {MANIFEST} entry")
        if not path.is_file():
            raise UserError(f"{flag}: {show(path)} is listed in {MANIFEST} but missing; restore the model files")
        got = sha256_file(path)
        if got != want:
            raise UserError(f"{flag}: {show(path)} does not match {MANIFEST} (sha256 {got[:12]}… instead of "
                            f"{want[:12]}…); the file is damaged or was changed: restore it (reinstall "
                            "mclcbf-diag for the embedded model)")
    return len(expected)
