"""storage.py: atomic writes, durable appends, folder locks, names and manifests."""

import errno
import hashlib
import os
from pathlib import Path

import pytest

from mclcbf_diag import shipped, storage
from mclcbf_diag.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = shipped.WEIGHTS


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "page.html"
    storage.atomic_write_text(path, "old")
    storage.atomic_write_text(path, "new content")
    assert path.read_text() == "new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"], "a temporary file was left behind"


def test_full_disk_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    path.write_text("previous\n")
    monkeypatch.setattr(storage.os, "write", _enospc)
    with pytest.raises(UserError) as info:
        storage.atomic_write_text(path, "x" * 10_000)
    msg = str(info.value)
    assert "metrics.csv" in msg and "no space left on device" in msg and "\n" not in msg
    assert path.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_atomic_write_with_a_writer(tmp_path):
    path = tmp_path / "x.parquet"
    storage.atomic_write_with(path, lambda tmp: tmp.write_bytes(b"PAR1"))
    assert path.read_bytes() == b"PAR1" and len(list(tmp_path.iterdir())) == 1


def test_append_on_full_disk_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "answers.jsonl"
    storage.append_bytes(path, b'{"a": 1}\n')
    monkeypatch.setattr(storage.os, "write", _enospc)
    with pytest.raises(UserError, match="no space left on device") as info:
        storage.append_bytes(path, b'{"a": 2}\n')
    assert "answers.jsonl" in str(info.value) and "rerun" in str(info.value)
    assert path.read_bytes() == b'{"a": 1}\n'


def test_lock_refuses_a_second_holder_naming_it(tmp_path):
    with storage.FolderLock(tmp_path):
        with pytest.raises(UserError) as info:
            storage.FolderLock(tmp_path).acquire()
        msg = str(info.value)
        assert f"pid {os.getpid()}" in msg and "in use" in msg and "--out" in msg
    with storage.FolderLock(tmp_path):  # released: takes it again
        pass


def test_safe_name_contains_and_disambiguates():
    for raw in ("/../../escaped_trace", "a/b", "..", "x\\y", "\0", "é"):
        name = storage.safe_name(raw)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name
        assert Path(name).name == name
    assert storage.safe_name("a_b") == "a_b" and storage.safe_name("17") == "17"
    assert storage.safe_name("a/b") != storage.safe_name("a_b")
    assert len(storage.safe_name("q" * 5000)) < 100


@pytest.mark.parametrize("entry", ["/etc/passwd", "../secret.png", "a/../../b.png", "sub/../../x"])
def test_contained_refuses_escapes(tmp_path, entry):
    with pytest.raises(UserError, match="not a plain relative path"):
        storage.contained(tmp_path, entry, "image")
    assert storage.contained(tmp_path, "sub/ok.png", "image") == tmp_path / "sub" / "ok.png"


def test_shipped_manifest_matches_the_shipped_weights():
    """MANIFEST.sha256 is what write_manifest computes from the shipped files, and verifies."""
    from mclcbf_diag.cli.embedded import _manifest_names

    listed = storage.read_manifest(WEIGHTS)
    assert sorted(listed) == _manifest_names(WEIGHTS)
    for name, digest in listed.items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    assert storage.verify_manifest(WEIGHTS) == len(listed)


def test_verify_catches_a_flipped_byte(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abcdef")
    storage.write_manifest(tmp_path)
    assert storage.verify_manifest(tmp_path) == 1
    (tmp_path / "model.safetensors").write_bytes(b"abcdeF")
    with pytest.raises(UserError, match="does not match MANIFEST.sha256"):
        storage.verify_manifest(tmp_path)
    (tmp_path / "MANIFEST.sha256").unlink()
    with pytest.raises(UserError, match="has no MANIFEST.sha256"):
        storage.verify_manifest(tmp_path)


def test_contained_refuses_a_link_that_leaves_the_folder(tmp_path):
    inside, outside = tmp_path / "images", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (inside / "a.png").symlink_to(outside / "secret.png")
    (inside / "dir").symlink_to(outside, target_is_directory=True)
    for entry in ("a.png", "dir/secret.png"):
        with pytest.raises(UserError, match="symbolic link .* outside"):
            storage.contained(inside, entry, "image")
    # a link that stays inside the folder, and a folder reached through a link, are fine
    (inside / "real.png").write_bytes(b"x")
    (inside / "b.png").symlink_to(inside / "real.png")
    assert storage.contained(inside, "b.png", "image") == inside / "b.png"
    (tmp_path / "via").symlink_to(inside, target_is_directory=True)
    assert storage.contained(tmp_path / "via", "real.png", "image") == tmp_path / "via" / "real.png"
