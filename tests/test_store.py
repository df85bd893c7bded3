"""The content-addressed store: verified ingest, atomic publish, key records, prune."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from sporevm.errors import StoreError
from sporevm.store import Store


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_ingest_verifies_and_publishes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    data = b"hello blob"
    path = store.ingest_blob(digest_of(data), [data[:3], data[3:]], max_size=100, what="t")
    assert path.read_bytes() == data and store.has_blob(digest_of(data))
    assert store.read_blob(digest_of(data), max_size=100, what="t") == data


def test_ingest_rejects_wrong_bytes_and_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    want = digest_of(b"expected")
    with pytest.raises(StoreError, match="expected " + want):
        store.ingest_blob(want, [b"substituted"], max_size=100, what="layer x")
    assert not store.has_blob(want)
    assert list((store.root / "tmp").iterdir()) == []
    assert not any(p.name.startswith(".tmp") for p in (store.root / "blobs/sha256").iterdir())


def test_ingest_size_bound(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    data = b"x" * 10
    with pytest.raises(StoreError, match="more than 9 bytes"):
        store.ingest_blob(digest_of(data), [data], max_size=9, what="t")


def test_bad_digest_strings_rejected(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    for bad in ("sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:00", ""):
        with pytest.raises(StoreError):
            store.blob_path(bad)


def test_corrupt_entry_detected_on_read_and_evicted(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    data = b'{"a": 1}'
    path = store.ingest_blob_bytes(digest_of(data), data, what="t")
    path.write_bytes(b'{"a": 2}')
    with pytest.raises(StoreError, match="does not match its digest"):
        store.read_blob(digest_of(data), max_size=100, what="t")
    assert store.evict_if_corrupt(digest_of(data)) is True
    assert not store.has_blob(digest_of(data))


def test_key_records_roundtrip_and_corrupt_is_a_miss(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    key = "c" * 64
    assert store.get_key("rootfs", key) is None
    store.put_key("rootfs", key, {"digest": "x", "size": 1})
    assert store.get_key("rootfs", key) == {"digest": "x", "size": 1}
    (store.root / "keys/rootfs" / f"{key}.json").write_bytes(b"{not json")
    assert store.get_key("rootfs", key) is None
    with pytest.raises(StoreError):
        store.get_key("rootfs", "../x")


def test_prune_by_age_and_all(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    old, new = b"old", b"new"
    p_old = store.ingest_blob_bytes(digest_of(old), old, what="t")
    store.ingest_blob_bytes(digest_of(new), new, what="t")
    os.utime(p_old, (time.time() - 3600, time.time() - 3600))
    (store.root / "tmp" / "leftover").write_bytes(b"partial")
    removed = store.prune(older_than=60)
    assert [e.name for e in removed] == [digest_of(old)]
    assert store.has_blob(digest_of(new)) and not list((store.root / "tmp").iterdir())
    store.prune(older_than=None)
    assert store.entries() == []


def test_prune_waits_for_running_build(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    data = b"in use"
    store.ingest_blob_bytes(digest_of(data), data, what="t")
    done = threading.Event()
    with store.lock():

        def prune_all() -> None:
            store.prune(None)
            done.set()

        t = threading.Thread(target=prune_all)
        t.start()
        time.sleep(0.3)
        assert not done.is_set()  # blocked on the shared lock the build holds
        assert store.has_blob(digest_of(data))
    t.join(5)
    assert done.is_set() and not store.has_blob(digest_of(data))


def test_a_use_is_recorded_at_most_every_ten_minutes(tmp_path: Path) -> None:
    """store.touch is relatime-like: a run does not rewrite the inodes it resolves each
    time, yet a use after TOUCH_EVERY is recorded (prune's last-use time)."""
    from sporevm.store import TOUCH_EVERY

    store = Store(tmp_path / "s")
    key = "a" * 64
    store.put_key("rootfs", key, {"x": 1})
    path = store.root / "keys/rootfs" / f"{key}.json"
    recent = time.time() - TOUCH_EVERY / 2
    os.utime(path, (recent, recent))
    assert store.get_key("rootfs", key) == {"x": 1}
    assert path.stat().st_mtime == pytest.approx(recent)  # recorded recently enough: no write
    stale = time.time() - TOUCH_EVERY - 60
    os.utime(path, (stale, stale))
    assert store.get_key("rootfs", key) == {"x": 1}
    assert path.stat().st_mtime > time.time() - 60  # a use after TOUCH_EVERY is recorded
