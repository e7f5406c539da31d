"""sdkit.atomic: nothing half-written ever appears under the final name."""

import pytest

from sdkit.atomic import atomic_dir, atomic_write_path, is_temporary


def test_file_appears_only_when_complete(tmp_path):
    final = tmp_path / "sub" / "weights.safetensors"
    with atomic_write_path(final) as tmp:
        assert tmp.parent == final.parent and is_temporary(tmp)
        tmp.write_bytes(b"abc")
        assert not final.exists()
    assert final.read_bytes() == b"abc"
    assert [p.name for p in final.parent.iterdir()] == ["weights.safetensors"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "model.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert final.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [final]


def test_file_overwrite_refused_when_asked(tmp_path):
    final = tmp_path / "x"
    final.write_text("keep")
    with pytest.raises(FileExistsError):
        with atomic_write_path(final, overwrite=False) as tmp:
            tmp.write_text("new")
    assert final.read_text() == "keep"
    assert list(tmp_path.iterdir()) == [final]
    with atomic_write_path(final) as tmp:  # default replaces
        tmp.write_text("new")
    assert final.read_text() == "new"


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_write_path(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()


def test_folder_appears_only_when_complete_and_globs_skip_temporaries(tmp_path):
    final = tmp_path / "checkpoint-10"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("b")
        assert not final.exists()
        assert list(tmp_path.glob("checkpoint-*")) == []  # a half-written checkpoint is invisible
    assert (final / "nested" / "b.txt").read_text() == "b"
    assert list(tmp_path.iterdir()) == [final]


def test_failed_folder_keeps_the_old_one(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert list(tmp_path.iterdir()) == [final]


def test_folder_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(final) as tmp:  # default refuses
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert list(tmp_path.iterdir()) == [final]
