"""replace_dir: a directory output replaced in one step (renameat2 RENAME_EXCHANGE),
and only if the old directory is empty or of the kind being written."""

from __future__ import annotations

from pathlib import Path

import pytest

from sporevm.atomic import DirKind, NotReplaceable, replace_dir

KIND = DirKind("test directory", "f", frozenset({"f", "sub"}))


def _staged(root: Path, name: str, text: str) -> Path:
    d = root / name
    d.mkdir()
    (d / "f").write_text(text)
    return d


def test_replace_dir_publishes_and_swaps(tmp_path: Path) -> None:
    first = _staged(tmp_path, "first", "one")
    replace_dir(first, tmp_path / "out", KIND)
    assert (tmp_path / "out" / "f").read_text() == "one" and not first.exists()
    replace_dir(_staged(tmp_path, "second", "two"), tmp_path / "out", KIND)
    assert (tmp_path / "out" / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


def test_replace_dir_takes_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    replace_dir(_staged(tmp_path, "s", "new"), tmp_path / "out", KIND)
    assert (tmp_path / "out" / "f").read_text() == "new"


def test_replace_dir_refuses_a_file_or_symlink(tmp_path: Path) -> None:
    staged = _staged(tmp_path, "staged", "x")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(staged)
    for dest in ("file", "link"):
        with pytest.raises(NotReplaceable, match="not a test directory"):
            replace_dir(staged, tmp_path / dest, KIND)
    assert staged.is_dir() and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("plant", ["stranger", "no-marker", "marker-is-dir", "marker-is-link"])
def test_replace_dir_never_deletes_what_is_not_its_kind(tmp_path: Path, plant: str) -> None:
    """The data-loss case: `--out` naming a directory of the user's must leave it whole."""
    out = tmp_path / "out"
    out.mkdir()
    if plant == "stranger":
        (out / "f").write_text("old")
        (out / "thesis.txt").write_text("years of work")
    elif plant == "no-marker":
        (out / "sub").mkdir()
        (out / "sub" / "thesis.txt").write_text("years of work")
    elif plant == "marker-is-dir":
        (out / "f").mkdir()
        (out / "f" / "thesis.txt").write_text("years of work")
    else:
        (tmp_path / "thesis.txt").write_text("years of work")
        (out / "f").symlink_to(tmp_path / "thesis.txt")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    staged = _staged(tmp_path, "staged", "new")
    with pytest.raises(NotReplaceable, match=r"out: exists and is not a test directory \(") as e:
        replace_dir(staged, out, KIND)
    assert "\n" not in str(e.value)
    staged_files = {"staged", "staged/f"}
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert sorted(set(after) - staged_files) == before
    assert "years of work" in {p.read_text() for p in tmp_path.rglob("thesis.txt")}
