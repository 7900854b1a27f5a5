"""vla_dist/atomic.py: whole or absent, the usual file mode, nothing left behind."""

from __future__ import annotations

import json
import os

import pytest

from vla_dist import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("fsync", [False, True])
def test_write_text_replaces_with_the_usual_mode(tmp_path, umask_022, fsync):
    target = tmp_path / "f.txt"
    target.write_text("old", encoding="utf-8")
    os.chmod(target, 0o600)
    assert atomic.write_text(target, "new ü", fsync=fsync) == target
    assert target.read_text(encoding="utf-8") == "new ü"
    assert target.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600, not the old file's mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_replacing_leaves_the_target_on_error(tmp_path):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(target, suffix=".mp4") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".v.mp4.") and tmp.name.endswith(".mp4")
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_replacing_writer_that_writes_nothing_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError), atomic.replacing(tmp_path / "x"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_write_json_creates_parents_and_stringifies(tmp_path):
    path = tmp_path / "a" / "b" / "report.json"
    atomic.write_json(path, {"path": tmp_path, "n": 1})
    assert json.loads(path.read_text()) == {"path": str(tmp_path), "n": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_replace_symlink_repoints(tmp_path):
    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_2").mkdir()
    link = tmp_path / "best"
    atomic.replace_symlink("step_1", link)
    assert os.readlink(link) == "step_1"
    atomic.replace_symlink("step_2", link)
    assert os.readlink(link) == "step_2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_1", "step_2"]
