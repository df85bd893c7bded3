"""A store with entries planted by someone else (a CI cache restore, a shared
directory): the store never follows a link it did not make, and every command
fails with one line naming the entry, touching nothing outside the store."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from sporevm.cli import main
from sporevm.store import Store


def _outside(root: Path) -> dict[str, bytes]:
    """A directory of someone else's files, some old enough for any prune."""
    (root / "sub").mkdir(parents=True)
    (root / "keep.txt").write_bytes(b"keep")
    (root / "sub" / "deep.txt").write_bytes(b"deep")
    (root / ("ab" * 32)).write_bytes(b"looks like an entry")
    for p in root.rglob("*"):
        os.utime(p, (time.time() - 10**6, time.time() - 10**6))
    return _tree(root)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"/")
        for p in sorted(root.rglob("*"))
    }


def _one_error_line(err: str, *needles: str) -> None:
    assert err.startswith("spore: error: store ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize(
    "planted", ["tmp", "chunks/blake3", "chunks", "keys/rootfs", "state", "blobs/sha256", "roots"]
)
@pytest.mark.parametrize(
    "command", [["cache", "prune", "--all", "--no-wait"], ["cache", "ls"], ["cache", "verify"]]
)
def test_planted_directory_link_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    planted: str,
    command: list[str],
) -> None:
    home = tmp_path / "home"
    Store(home)
    outside = tmp_path / "outside"
    before = _outside(outside)
    target = home / planted
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(outside)
    monkeypatch.setenv("SPORE_HOME", str(home))
    assert main(command) != 0
    _one_error_line(capsys.readouterr().err, f"{planted} is a symbolic link")
    assert _tree(outside) == before


def test_planted_lock_link_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    Store(home)
    victim = tmp_path / "victim-file"
    (home / "lock").symlink_to(victim)  # dangling: O_CREAT would make it
    monkeypatch.setenv("SPORE_HOME", str(home))
    assert main(["cache", "prune", "--all", "--no-wait"]) != 0
    _one_error_line(capsys.readouterr().err, "lock is not a regular file")
    assert not victim.exists() and not victim.is_symlink()


def test_lock_planted_after_open_is_not_followed(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    (store.root / "lock").unlink(missing_ok=True)
    (store.root / "lock").symlink_to(tmp_path / "victim")
    with pytest.raises(Exception, match="lock is not a regular file"):
        with store.lock():
            pass
    assert not (tmp_path / "victim").exists()


def test_planted_entry_link_is_removed_not_followed(tmp_path: Path) -> None:
    """A link inside a content directory is an entry like any other: prune deletes the
    link itself; what it points to stays."""
    store = Store(tmp_path / "home")
    outside = tmp_path / "outside"
    before = _outside(outside)
    (store.root / "chunks" / "blake3" / ("cd" * 32)).symlink_to(outside / ("ab" * 32))
    (store.root / "kernels" / "blake3" / ("ef" * 32)).symlink_to(outside)
    (store.root / "tmp" / "staged").symlink_to(outside)
    store.prune(None, wait=0)
    assert _tree(outside) == before
    assert list((store.root / "chunks" / "blake3").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_store_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Store(home)
    os.chown(home / "chunks", 4242, 4242)
    with pytest.raises(Exception, match=r"chunks is owned by uid 4242, not by this user"):
        Store(home)


def test_prune_removes_a_kernel_directory_through_descriptors(tmp_path: Path) -> None:
    store = Store(tmp_path / "home")
    kdir = store.root / "kernels" / "blake3" / ("12" * 32)
    kdir.mkdir()
    (kdir / "bzImage").write_bytes(b"k")
    (kdir / "escape").symlink_to(tmp_path)  # a link inside an entry is never followed
    (tmp_path / "precious").write_text("x")
    removed = store.prune(None, wait=0)
    assert [e.kind for e in removed] == ["kernel"]
    assert not kdir.exists() and (tmp_path / "precious").read_text() == "x"
    assert list((store.root / "tmp").iterdir()) == []
