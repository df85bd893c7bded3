"""Sporefile.lock decoding is strict and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sporevm.build import lockfile
from sporevm.errors import SporefileError

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_roundtrip_sorted_and_canonical(tmp_path: Path) -> None:
    path = tmp_path / "Sporefile.lock"
    lock = lockfile.Lock().with_image(lockfile.LockedImage("b:1", "linux/amd64", D1, D2))
    lock = lock.with_image(lockfile.LockedImage("a:1", "linux/arm64/v8", D2, D2))
    lockfile.save(path, lock)
    assert lockfile.load(path) == lock
    assert [e.image for e in lockfile.load(path).images] == ["a:1", "b:1"]
    assert path.read_bytes() == lock.encode()
    replaced = lock.with_image(lockfile.LockedImage("a:1", "linux/arm64/v8", D1, D1))
    assert replaced.find("a:1", "linux/arm64/v8") == lockfile.LockedImage(
        "a:1", "linux/arm64/v8", D1, D1
    )
    assert len(replaced.images) == 2


def test_missing_lock_is_empty(tmp_path: Path) -> None:
    assert lockfile.load(tmp_path / "nope.lock") == lockfile.Lock()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"{", "not valid JSON"),
        (b'{"lockVersion": 2, "images": []}', "lockVersion"),
        (b'{"lockVersion": 1, "images": [], "extra": 1}', "extra: unknown key"),
        (b'{"lockVersion": true, "images": []}', "lockVersion"),
        (
            b'{"lockVersion": 1, "images": [{"image": "a", "platform": "linux/amd64", '
            b'"digest": "sha256:00", "manifest": "sha256:00"}]}',
            "images[0].digest",
        ),
        (b'{"lockVersion": 1, "images": [{"image": "a"}]}', "images[0]"),
    ],
)
def test_bad_locks_fail_with_the_field_named(tmp_path: Path, text: bytes, needle: str) -> None:
    path = tmp_path / "Sporefile.lock"
    path.write_bytes(text)
    with pytest.raises(SporefileError) as err:
        lockfile.load(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_guest_entries_roundtrip_and_validate(tmp_path: Path) -> None:
    path = tmp_path / "Sporefile.lock"
    b1, b2 = "blake3:" + "1" * 64, "blake3:" + "2" * 64
    lock = lockfile.Lock().with_guest(lockfile.LockedGuest("kvm-pvm", b1, b2))
    lock = lock.with_guest(lockfile.LockedGuest("kvm", b2, b1))
    lockfile.save(path, lock)
    loaded = lockfile.load(path)
    assert loaded == lock and [g.host_class for g in loaded.guests] == ["kvm", "kvm-pvm"]
    assert loaded.find_guest("kvm-pvm") == lockfile.LockedGuest("kvm-pvm", b1, b2)
    bad = {"hostClass": "xen", "kernel": b1, "initrd": b2}
    path.write_text(json.dumps({"lockVersion": 1, "images": [], "guests": [bad]}))
    with pytest.raises(SporefileError, match=r"guests\[0\]\.hostClass"):
        lockfile.load(path)
