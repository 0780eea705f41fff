"""mclcbf_diag.fingerprints: a content digest of files, the same for the same bytes wherever and whenever written,
and its sha256 cache (against hashlib on the bytes)."""

import hashlib
import json
import os
import shutil

import pytest

from mclcbf_diag import fingerprints as F


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MCLCBF_DIAG_CACHE", str(folder))
    return folder / F.CACHE_FILE


def _settle(monkeypatch):
    """Files written a moment ago count as settled (their keys trusted), as they would two seconds later."""
    monkeypatch.setattr(F, "RACY_SECONDS", -1.0)


def _tree(root, files):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return [root / n for n in files]


def test_the_same_bytes_elsewhere_and_later_give_the_same_fingerprint(tmp_path, cache):
    files = {"a.png": b"1234", "sub/b.png": b"56"}
    here = _tree(tmp_path / "here", files)
    there = _tree(tmp_path / "moved" / "there", files)
    for p in there:
        os.utime(p, ns=(1, 1))  # another checkout: other times
    assert F.content_fingerprint(here, tmp_path / "here") == F.content_fingerprint(there, tmp_path / "moved/there")
    # in another order and with a repeat
    assert F.content_fingerprint([*here[::-1], here[0]], tmp_path / "here") == \
        F.content_fingerprint(here, tmp_path / "here")


def test_changed_bytes_a_renamed_or_a_missing_file_change_it(tmp_path, cache):
    root = tmp_path / "m"
    paths = _tree(root, {"a.png": b"1234", "b.png": b"56"})
    before = F.content_fingerprint(paths, root)
    paths[0].write_bytes(b"1235")  # same size
    assert F.content_fingerprint(paths, root) != before
    paths[0].write_bytes(b"1234")
    assert F.content_fingerprint(paths, root) == before
    shutil.move(paths[1], root / "c.png")
    assert F.content_fingerprint([paths[0], root / "c.png"], root) != before
    assert F.content_fingerprint(paths, root) != before  # b.png missing


def test_a_hash_is_remembered_and_a_file_rewritten_in_place_is_hashed_again(tmp_path, cache, monkeypatch):
    _settle(monkeypatch)
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"x" * 3000)
    assert F.file_sha256(p) == hashlib.sha256(b"x" * 3000).hexdigest()
    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [e["sha256"] for e in entries] == [hashlib.sha256(b"x" * 3000).hexdigest()]
    # the cache answers for an unchanged file (a planted entry under its key is believed)
    st = os.stat(p)
    cache.write_text(json.dumps({"key": F._key(st), "sha256": "planted"}) + "\n" + "{damaged\n")
    assert F.file_sha256(p) == "planted"
    # rewritten in place, same size, its modification time set back (as cp -p or tar do): the change time differs
    p.write_bytes(b"y" * 3000)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_ctime_ns != st.st_ctime_ns or pytest.skip("the file system keeps no change time")
    assert F.file_sha256(p) == hashlib.sha256(b"y" * 3000).hexdigest()


def test_a_file_changed_just_now_is_hashed_every_time(tmp_path, cache):
    """Within RACY_SECONDS of a change a key is not trusted: a rewrite in the same clock tick (same key on a file
    system with coarse times) still gives the new hash."""
    p = tmp_path / "a"
    p.write_bytes(b"1234")
    st = os.stat(p)
    assert F.file_sha256(p) == hashlib.sha256(b"1234").hexdigest()
    assert not cache.exists()  # not remembered
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": F._key(st), "sha256": "planted"}) + "\n")
    assert F.file_sha256(p) == hashlib.sha256(b"1234").hexdigest()  # not looked up


def test_an_unwritable_cache_still_hashes(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MCLCBF_DIAG_CACHE", str(blocker / "sub"))  # below a file: cannot be made
    p = tmp_path / "a"
    p.write_bytes(b"abc")
    assert F.file_sha256(p) == hashlib.sha256(b"abc").hexdigest()


def test_files_outside_the_base_stay_apart_and_move_with_it(tmp_path, cache):
    """Two files with one name outside ``base`` are two entries (named through ``..``), and the digest moves with a
    tree that holds the base and them: it is the digest, by hand, of the relative names and the bytes."""
    def tree(root):
        _tree(root, {"base/a.png": b"1", "x/c.png": b"2", "y/c.png": b"3"})
        return [root / "base/a.png", root / "x/c.png", root / "y/c.png"], root / "base"

    paths, base = tree(tmp_path / "one")
    h = hashlib.sha256()
    for name, data in sorted({"a.png": b"1", "../x/c.png": b"2", "../y/c.png": b"3"}.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    assert F.content_fingerprint(paths, base) == h.hexdigest()
    assert F.content_fingerprint(*tree(tmp_path / "two" / "deeper")) == h.hexdigest()
    swapped = [paths[0], paths[2], paths[1]]
    (tmp_path / "one/x/c.png").write_bytes(b"3")
    (tmp_path / "one/y/c.png").write_bytes(b"2")
    assert F.content_fingerprint(swapped, base) != h.hexdigest()  # the same two contents, under the other names
