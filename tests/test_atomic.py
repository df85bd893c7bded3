"""replace_dir: a directory output replaced in one step (renameat2 RENAME_EXCHANGE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sporevm.atomic import replace_dir


def test_replace_dir_publishes_and_swaps(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.mkdir()
    (first / "f").write_text("one")
    replace_dir(first, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "one" and not first.exists()
    second = tmp_path / "second"
    second.mkdir()
    (second / "f").write_text("two")
    replace_dir(second, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


def test_replace_dir_refuses_a_file_or_symlink(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(staged)
    for dest in ("file", "link"):
        with pytest.raises(FileExistsError, match="not a directory"):
            replace_dir(staged, tmp_path / dest)
    assert staged.is_dir() and (tmp_path / "file").read_text() == "x"
