"""What a run read, by content: the part of a run's identity that names its model files and images.

A resumed run compares its identity with the one its folder holds (:mod:`mclcbf_diag.pope.store`), so the
identity must change exactly when an answer could: when a file's *content* changes, not when the same files are
checked out again, copied or moved (their modification times and paths then change, their bytes do not).
:func:`content_fingerprint` is a digest of each file's name (relative to a folder) and the sha256 of its bytes.

Hashing a 7B model's 14 GB takes about ten seconds, so a file's sha256 is remembered in the user's cache
(``$XDG_CACHE_HOME/mclcbf-diag/sha256.jsonl``, else ``~/.cache/…``; ``MCLCBF_DIAG_CACHE`` names another folder),
keyed by the file's device, inode, size, modification and change times (a change time cannot be set back, as
``cp -p`` or ``tar`` set a modification time back): a file rewritten in place gets a new key and is hashed again.
A file changed within the last :data:`RACY_SECONDS` is neither looked up nor remembered (a change in the same
clock tick as the hash would keep its key, as git treats its "racy" entries), and a file whose key changed while
it was read is not remembered. Each entry is one line appended in one write, so processes sharing the cache on a
local disk never tear each other's lines; a damaged line is skipped (that file is hashed again). Where the cache
cannot be written, files are hashed every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from .storage import sha256_file

CACHE_FILE = "sha256.jsonl"
RACY_SECONDS = 2.0  # a file changed this recently is hashed every time (see the module docstring)


def cache_dir() -> Path:
    """The folder of the sha256 cache (see the module docstring)."""
    if os.environ.get("MCLCBF_DIAG_CACHE"):
        return Path(os.environ["MCLCBF_DIAG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mclcbf-diag"


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _settled(st: os.stat_result) -> bool:
    """Whether the file was last changed long enough ago for its key to be trusted."""
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_SECONDS * 1e9


def _remembered() -> dict[str, str]:
    """The cache's entries, key → sha256 (empty when it is absent or unreadable)."""
    try:
        text = (cache_dir() / CACHE_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            out[str(entry["key"])] = str(entry["sha256"])
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line: that file is hashed again
    return out


def _remember(key: str, sha: str) -> None:
    line = (json.dumps({"key": key, "sha256": sha}) + "\n").encode()
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir() / CACHE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return  # no cache where it cannot be written
    try:
        os.write(fd, line)  # one write of one short line under O_APPEND: never interleaved with another's
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path, known: dict[str, str] | None = None) -> str:
    """The sha256 of a file's bytes, from the cache when the file is unchanged since it was hashed.

    Args:
        path: the file.
        known: the cache's entries, read once by a caller hashing many files (None: read here).

    Raises:
        OSError: the file cannot be read.
    """
    st = os.stat(path)
    key, settled = _key(st), _settled(st)
    known = _remembered() if known is None else known
    if settled and key in known:
        return known[key]
    sha = sha256_file(path)
    if settled and _key(os.stat(path)) == key:  # not changed while it was read
        _remember(key, sha)
        known[key] = sha
    return sha


def content_fingerprint(paths: Iterable[str | Path], base: str | Path | None = None) -> str:
    """Digest of ``paths``' names (relative to ``base``, else the file name) and contents (sorted, unique): the
    same for the same files wherever they sit and whenever they were written; a missing file counts as missing.

    Args:
        paths: the files.
        base: the folder their names are taken relative to (a path outside it: relative too, through ``..``, so two
            such files with one file name stay two); None: each file's name alone.
    """
    known = _remembered()
    named = {(Path(os.path.relpath(p, base)) if base is not None else Path(p.name)).as_posix(): p
             for p in {Path(p) for p in paths}}
    h = hashlib.sha256()
    for name, p in sorted(named.items()):
        try:
            meta = file_sha256(p, known)
        except OSError:
            meta = "missing"
        h.update(os.fsencode(name) + b"\0" + meta.encode() + b"\n")
    return h.hexdigest()
