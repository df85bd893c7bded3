"""replace_dir: a directory output replaced in one step (renameat2 RENAME_EXCHANGE),
and only if the old directory is empty or of the kind being written; on overlayfs,
where a lower-layer directory cannot be swapped, entry by entry."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
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


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    """An overlayfs whose lower layer holds ``out`` (a KIND directory), as in a CI
    container whose image ships the output directory; yields the merged view."""
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    for d in ("lower/out/sub", "upper", "work", "merged"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "lower" / "out" / "f").write_text("old")
    (tmp_path / "lower" / "out" / "sub" / "g").write_text("old too")
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    mounted = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(tmp_path / "merged")],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {mounted.stderr.strip()}")
    try:
        yield tmp_path / "merged"
    finally:
        subprocess.run(["umount", str(tmp_path / "merged")], check=False)


def test_replace_dir_from_a_lower_overlayfs_layer(overlay: Path) -> None:
    """renameat2 refuses to swap a lower-layer directory (EXDEV): the entries are
    replaced one by one, and only the kind's own entries are ever deleted."""
    staged = _staged(overlay, "staged", "new")
    replace_dir(staged, overlay / "out", KIND)
    assert (overlay / "out" / "f").read_text() == "new"
    assert sorted(os.listdir(overlay / "out")) == ["f"]  # the old sub/ is gone
    assert sorted(os.listdir(overlay)) == ["out"]
    # and once more, now that out/ is partly in the upper layer
    replace_dir(_staged(overlay, "again", "newer"), overlay / "out", KIND)
    assert (overlay / "out" / "f").read_text() == "newer"


def test_replace_dir_in_overlayfs_still_refuses_strangers(overlay: Path) -> None:
    (overlay / "out" / "thesis.txt").write_text("years of work")
    with pytest.raises(NotReplaceable, match="thesis.txt"):
        replace_dir(_staged(overlay, "staged", "new"), overlay / "out", KIND)
    assert (overlay / "out" / "f").read_text() == "old"
    assert (overlay / "out" / "thesis.txt").read_text() == "years of work"
