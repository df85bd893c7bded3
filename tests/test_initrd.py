"""The guest initramfs: reproducible, cached by content key, readable by cpio(1)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sporevm.build import initrd
from sporevm.build.initrd import CpioEntry, InitrdError, ensure_initrd, pack_cpio
from sporevm.store import Store, blake3_file


def _parse_newc(data: bytes) -> list[dict[str, int | str | bytes]]:
    """Independent reader of what pack_cpio writes (strict: the test's oracle)."""
    out: list[dict[str, int | str | bytes]] = []
    pos = 0
    names = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "mtime",
        "filesize",
        "devmajor",
        "devminor",
        "rdevmajor",
        "rdevminor",
        "namesize",
        "check",
    )
    while True:
        assert data[pos : pos + 6] == b"070701" and pos % 4 == 0
        fields = {n: int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_end = pos + 110 + fields["namesize"]
        name = data[pos + 110 : name_end - 1].decode()
        assert data[name_end - 1] == 0
        body = (name_end + 3) & ~3
        content = data[body : body + fields["filesize"]]
        pos = (body + fields["filesize"] + 3) & ~3
        if name == "TRAILER!!!":
            assert set(data[pos:]) <= {0} and len(data) % 512 == 0
            return out
        out.append({**fields, "name": name, "data": content})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, initrd.InitrdArtifact]:
    store = Store(tmp_path_factory.mktemp("initrd") / "store")
    return store, ensure_initrd(store)


def test_two_stores_build_identical_bytes(
    built: tuple[Store, initrd.InitrdArtifact], tmp_path: Path
) -> None:
    _, first = built
    second = ensure_initrd(Store(tmp_path / "other"))
    assert second.digest == first.digest and second.agent_digest == first.agent_digest
    assert first.path.read_bytes() == second.path.read_bytes()
    assert blake3_file(first.path) == (first.digest, first.size)


def test_layout(built: tuple[Store, initrd.InitrdArtifact]) -> None:
    store, art = built
    entries = _parse_newc(art.path.read_bytes())
    assert [e["name"] for e in entries] == [
        "dev",
        "dev/console",
        "init",
        "newroot",
        "proc",
        "run",
        "sys",
    ]
    assert [e["ino"] for e in entries] == list(range(1, 8))
    for e in entries:
        assert (e["uid"], e["gid"], e["mtime"]) == (0, 0, 0)
    console = entries[1]
    assert stat.S_ISCHR(int(console["mode"])) and (console["rdevmajor"], console["rdevminor"]) == (
        5,
        1,
    )
    init = entries[2]
    assert int(init["mode"]) == stat.S_IFREG | 0o755
    agent = initrd.guest_path(store, art.agent_digest).read_bytes()
    assert init["data"] == agent and agent[:4] == b"\x7fELF"


def test_agent_is_static_without_build_id(built: tuple[Store, initrd.InitrdArtifact]) -> None:
    store, art = built
    path = initrd.guest_path(store, art.agent_digest)
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed")
    headers = subprocess.run(
        ["readelf", "-lW", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "INTERP" not in headers and "DYNAMIC" not in headers
    notes = subprocess.run(
        ["readelf", "-n", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "Build ID" not in notes


def test_cpio_tool_reads_it(built: tuple[Store, initrd.InitrdArtifact]) -> None:
    if shutil.which("cpio") is None:  # scripts/setup installs it: never a silent skip
        pytest.fail("cpio is missing; run scripts/setup")
    _, art = built
    with open(art.path, "rb") as fh:
        out = subprocess.run(
            ["cpio", "-itv", "--quiet"], stdin=fh, capture_output=True, text=True, check=True
        ).stdout
    lines = out.splitlines()
    assert [ln.split()[-1] for ln in lines] == [
        "dev",
        "dev/console",
        "init",
        "newroot",
        "proc",
        "run",
        "sys",
    ]
    assert lines[1].startswith("crw-------") and "5,   1" in lines[1]


@pytest.mark.skipif(shutil.which("bsdtar") is None, reason="bsdtar not installed")
def test_bsdtar_reads_it(built: tuple[Store, initrd.InitrdArtifact]) -> None:
    _, art = built
    out = subprocess.run(
        ["bsdtar", "-tf", str(art.path)], capture_output=True, text=True, check=True
    ).stdout
    assert "init" in out.split()


def test_cache_hit_and_corruption(
    built: tuple[Store, initrd.InitrdArtifact], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, art = built

    def no_compile(*args: object, **kw: object) -> object:
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(subprocess, "run", no_compile)
    monkeypatch.setattr(initrd, "build_key", lambda _store=None: _KEY)
    store.put_key("guest-agent", _KEY, {"agent": art.agent_digest})
    assert ensure_initrd(store) == art  # both records hit, no compiler run
    art.path.write_bytes(b"corrupt")  # a damaged entry is a miss, never a result
    # ...unless the caller only compares digests (a restore): then nothing is re-hashed
    assert ensure_initrd(store, verify=False).digest == art.digest
    assert art.path.read_bytes() == b"corrupt"
    again = ensure_initrd(store)
    assert again.digest == art.digest and blake3_file(again.path)[0] == art.digest


_KEY = "ab" * 32


def test_key_follows_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "guest"
    shutil.copytree(initrd.GUEST_SRC, src)
    monkeypatch.setattr(initrd, "GUEST_SRC", src)
    before = initrd.build_key()
    assert initrd.build_key() == before
    with open(src / "agent.h", "a") as fh:
        fh.write("/* changed */\n")
    assert initrd.build_key() != before


def test_key_is_remembered_until_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "guest"
    shutil.copytree(initrd.GUEST_SRC, src)
    monkeypatch.setattr(initrd, "GUEST_SRC", src)
    store = Store(tmp_path / "store")
    fresh = initrd.build_key(store)
    assert fresh == initrd.build_key()  # the same key as computed without a store

    def no_subprocess(*_a: object, **_k: object) -> None:
        raise AssertionError("a remembered key runs no compiler")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert initrd.build_key(store) == fresh
    monkeypatch.undo()
    monkeypatch.setattr(initrd, "GUEST_SRC", src)
    with open(src / "agent.h", "a") as fh:
        fh.write("/* changed */\n")
    assert initrd.build_key(store) == initrd.build_key() != fresh


def test_compile_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    (src / "main.c").write_text("int main(void) { return undefined_thing; }\n")
    monkeypatch.setattr(initrd, "GUEST_SRC", src)
    with pytest.raises(InitrdError, match="(?s)compiling the guest agent failed:.*undefined_thing"):
        initrd.ensure_agent(Store(tmp_path / "store"))
    monkeypatch.setattr(initrd, "GUEST_SRC", tmp_path / "missing")
    with pytest.raises(InitrdError, match="sources not found"):
        initrd.build_key()


def test_pack_cpio_rules() -> None:
    d = stat.S_IFDIR | 0o755
    data = pack_cpio([CpioEntry("b", d), CpioEntry("a", stat.S_IFREG | 0o644, b"xyz")])
    parsed = _parse_newc(data)
    assert [(e["name"], e["data"], e["nlink"]) for e in parsed] == [("a", b"xyz", 1), ("b", b"", 2)]
    for bad in (CpioEntry("/abs", d), CpioEntry("a/../b", d), CpioEntry("", d)):
        with pytest.raises(InitrdError, match="bad cpio entry name"):
            pack_cpio([bad])
    with pytest.raises(InitrdError, match="duplicate"):
        pack_cpio([CpioEntry("a", d), CpioEntry("a", d)])
    with pytest.raises(InitrdError, match="not a regular file"):
        pack_cpio([CpioEntry("a", d, b"data")])
