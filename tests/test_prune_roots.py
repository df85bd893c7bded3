"""Prune by reachability (issue 13 item 7), no VM: live spores keep everything they need,
records keep what they name, roots are judged strictly, and `spore cache verify` stays
clean after every prune. Spores are synthetic (tests/test_bundle.py's make_spores)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import blake3
import pytest

from sporevm import storeroots
from sporevm.atomic import NotReplaceable
from sporevm.cli import main
from sporevm.errors import StoreError
from sporevm.spore import manifest as mf
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.sporedir import (
    SporeOpenError,
    keep_spore,
    open_spore,
    read_spore,
    write_spore,
)
from sporevm.store import Store
from sporevm.storecheck import verify_store
from sporevm.storeroots import Root, RootError
from tests.test_bundle import Spores, chunk_bytes, make_spores

OLD = time.time() - 30 * 86400


def age_everything(store: Store) -> None:
    """Make every entry and record look a month unused (prune by age would take all)."""
    for sub in ("blobs", "rootfs", "chunks", "kernels", "guest", "memfiles", "keys"):
        for p in (store.root / sub).rglob("*"):
            os.utime(p, (OLD, OLD), follow_symlinks=False)


def registered(tmp_path: Path, n_children: int = 2) -> Spores:
    s = make_spores(tmp_path, n_children)
    for d in [s.parent, *sorted(s.children.glob("*.spore"))]:
        keep_spore(str(d), s.store)
    return s


def restorable(store: Store, spore: Path) -> None:
    """What `spore run --from` checks before any VM: manifest, rootfs, every object."""
    m, _, rootfs = open_spore(spore, store)
    mf.verify_chunks(m, ChunkStore(store), rehash=True)
    assert rootfs.is_file()


def problems(store: Store) -> list[str]:
    return [f"{p.kind}: {p.path}: {p.message}" for p in verify_store(store).problems]


def garbage(store: Store) -> list[Path]:
    """Entries nothing reaches: a chunk, a rootfs, a memfile, a kernel dir, a blob."""
    cs = ChunkStore(store)
    out = [cs.path(cs.put(b"garbage chunk"))]
    img = store.root / "tmp" / "img"
    img.write_bytes(b"another rootfs")
    out.append(store.rootfs_path(store.install_rootfs(img)[0]))
    mem = store.root / "memfiles" / "blake3" / ("9" * 64)
    mem.write_bytes(b"\0" * 10)
    kdir = kernel_dir(store, b"unused bzImage", b"unused vmlinux")
    out += [mem, kdir, store.ingest_blob_bytes(sha(b"layer"), b"layer", what="t")]
    return out


def kernel_dir(store: Store, bzimage: bytes, vmlinux: bytes) -> Path:
    """A kernel entry as the build publishes it: named by the BLAKE3 of its bzImage."""
    kdir = store.root / "kernels" / "blake3" / b3(bzimage).split(":")[1]
    kdir.mkdir(parents=True)
    for name, body in (("bzImage", bzimage), ("vmlinux", vmlinux), ("config", b"c")):
        (kdir / name).write_bytes(body)
    return kdir


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b3(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


# -- live spores keep everything they need -----------------------------------------------


@pytest.mark.parametrize("older_than", [None, 0.0, 1.0])
def test_prune_keeps_what_live_spores_reach(tmp_path: Path, older_than: float | None) -> None:
    s = registered(tmp_path)
    junk = garbage(s.store)
    age_everything(s.store)
    res = s.store.collect(older_than)
    assert res.live_spores == 3
    assert not any(p.exists() for p in junk)
    for d in [s.parent, *sorted(s.children.iterdir())]:
        restorable(s.store, d)
    assert problems(s.store) == []
    # nothing left to take but cache records (open_spore's checked-manifest records)
    assert [e for e in s.store.collect(None).removed if not e.kind.startswith("key/")] == []


def test_gone_and_replaced_roots_are_dropped_and_their_objects_go(tmp_path: Path) -> None:
    s = registered(tmp_path)
    gone, kept = sorted(s.children.iterdir())
    private = {d: read_spore(str(d))[1].memory.chunks[3] for d in (gone, kept)}
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    assert any(p.kind == "stale" for p in verify_store(s.store).problems)
    age_everything(s.store)
    removed = s.store.prune(None)
    assert [e.name for e in removed if e.kind == "root"] == [str(gone)]
    cs = ChunkStore(s.store)
    assert not cs.has(str(private[gone])) and cs.has(str(private[kept]))
    restorable(s.store, kept)
    # Another spore written over a kept directory by hand: the old record no longer
    # matches what is there, so it is dropped (the new one is not known until kept).
    old_id, m, _ = read_spore(str(kept))
    other = dataclasses.replace(m, generation=mf.Generation(str(uuid.uuid4()), None, 0, 1))
    write_spore(other, kept)  # no store: not recorded
    assert problems(s.store) == [
        f"stale: roots/{Root(str(kept), old_id).name()}: root {kept}: "
        "holds another spore (its id differs) (the next prune drops "
        "this record)"
    ]
    assert [e.kind for e in s.store.prune(None) if e.kind == "root"] == ["root"]
    assert not cs.has(str(private[kept]))  # only the replaced child had it
    restorable(s.store, s.parent)
    assert problems(s.store) == []


def test_an_unregistered_spore_is_not_kept_until_kept(tmp_path: Path) -> None:
    s = make_spores(tmp_path, 1)  # directories written by hand: the store does not know them
    moved = tmp_path / "elsewhere.spore"
    s.parent.rename(moved)
    snapshot = {p.name for p in (s.store.root / "chunks" / "blake3").iterdir()}
    root, missing = keep_spore(str(moved), s.store)
    assert (root.path, missing) == (str(moved.resolve()), 0)
    s.store.prune(None)
    restorable(s.store, moved)
    child = next(s.children.iterdir())
    with pytest.raises(Exception, match="not in the store|missing|chunk"):
        restorable(s.store, child)  # never registered: its private chunk went
    assert {p.name for p in (s.store.root / "chunks" / "blake3").iterdir()} < snapshot


def test_keep_reports_missing_objects_and_checks_the_pin(tmp_path: Path) -> None:
    s = make_spores(tmp_path, 0)
    other = Store(tmp_path / "other")
    _, missing = keep_spore(str(s.parent), other)
    assert missing == 6  # 3 chunks, the state object, the rootfs and its block table
    assert keep_spore(str(s.parent), s.store)[1] == 0
    with pytest.raises(Exception, match="you pinned"):
        keep_spore(f"{s.parent}@blake3:{'0' * 64}", s.store)
    with pytest.raises(Exception, match="not a spore directory"):
        keep_spore(str(tmp_path / "nothing"), s.store)


# -- the publisher ---------------------------------------------------------------------------


def test_write_spore_records_the_root_and_drops_the_replaced_one(tmp_path: Path) -> None:
    s = make_spores(tmp_path, 0)
    _, m, _ = read_spore(str(s.parent))
    out = tmp_path / "out" / "x.spore"
    first = write_spore(m, out, s.store)
    second_m = dataclasses.replace(m, generation=mf.Generation(str(uuid.uuid4()), None, 0, 1))
    second = write_spore(second_m, out, s.store)
    survey = storeroots.survey_store(s.store.root)
    assert [
        (st.root.manifest if st.root else None, p.state if p else None) for st, p in survey
    ] == [(second, "live")]
    assert first != second and not list(out.parent.glob(".tmp-*"))
    empty = tmp_path / "empty.spore"
    empty.mkdir()  # rename(2) would replace an empty directory; the publisher never does
    with pytest.raises(NotReplaceable, match="already exists"):
        write_spore(m, empty, s.store, replace=False)
    assert list(empty.iterdir()) == [] and not list(tmp_path.glob(".tmp-*"))


def test_crash_between_record_and_rename_keeps_the_spore_still_there(tmp_path: Path) -> None:
    """A build replacing its output is killed after writing the new record: the old spore
    is still at the path, its record still there; prune keeps it and drops the other."""
    s = registered(tmp_path, 0)
    _, m, _ = read_spore(str(s.parent))
    cs = ChunkStore(s.store)
    new = dataclasses.replace(
        m,
        memory=dataclasses.replace(
            m.memory, chunks=(*m.memory.chunks[:3], cs.put(chunk_bytes(77)))
        ),
    )
    storeroots.add(s.store.root, storeroots.root_for(s.parent, mf.id_of(new)))
    age_everything(s.store)
    removed = s.store.prune(None)
    assert [e.kind for e in removed] == ["root", "chunk"]  # the new record, its own chunk
    restorable(s.store, s.parent)
    assert problems(s.store) == []


# -- records keep what they name ----------------------------------------------------------


def _oci_image(store: Store) -> tuple[str, list[str]]:
    """An index -> manifest -> config + layer, as the build stores them; (manifest, all)."""
    layer = b"\x1f\x8b layer bytes"
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(b"tar")]},
        }
    ).encode()
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha(man),
                    "size": len(man),
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    ).encode()
    for data in (layer, config, man, index):
        store.ingest_blob_bytes(sha(data), data, what="t")
    return sha(man), [sha(d) for d in (layer, config, man, index)]


def test_build_records_of_a_live_spore_are_kept_with_what_they_name(tmp_path: Path) -> None:
    s = registered(tmp_path, 0)
    store, cs = s.store, ChunkStore(s.store)
    _, m, data = read_spore(str(s.parent))
    mid = cs.put(data)  # as a build: the spore's manifest is its last step's snapshot
    man, blobs = _oci_image(store)
    vmlinux = b"the kernel the spore runs"
    kdir = kernel_dir(store, b"bz", vmlinux)
    guest = store.root / "guest" / "blake3"
    guest.mkdir(parents=True, exist_ok=True)
    (guest / b3(b"initrd").split(":")[1]).write_bytes(b"initrd")
    (guest / b3(b"agent").split(":")[1]).write_bytes(b"agent")
    step_key, older = "5" * 64, "4" * 64
    earlier = dataclasses.replace(
        m,
        generation=mf.Generation(str(uuid.uuid4()), None, 0, 1),
        memory=dataclasses.replace(m.memory, chunks=(cs.put(chunk_bytes(55)), None, None, None)),
    )
    m = dataclasses.replace(
        m,
        platform=dataclasses.replace(m.platform, kernel=b3(vmlinux), initrd=b3(b"initrd")),
        provenance=dataclasses.replace(m.provenance, steps=(older, step_key)),
    )
    mid = cs.put(mf.encode(m))
    write_spore(m, s.parent, store)
    store.put_key("step", step_key, {"manifest": mid, "step": "b", "exit": 0, "seconds": 1})
    store.put_key(
        "step",
        older,
        {"manifest": cs.put(mf.encode(earlier)), "step": "a", "exit": 0, "seconds": 1},
    )
    store.put_key("spore", "3" * 64, {"manifest": mid, "steps": [older, step_key]})
    store.put_key(
        "rootfs",
        "2" * 64,
        {
            "digest": m.rootfs.digest,
            "size": m.rootfs.size,
            "image": man,
            "builder": "spore-rootfs/1",
        },
    )
    store.put_key("initrd", "1" * 64, {"initrd": b3(b"initrd"), "agent": b3(b"agent"), "size": 6})
    store.put_key("guest-agent", "6" * 64, {"agent": b3(b"agent")})
    store.put_key("source-sha256", "9" * 64, {"ident": "x", "value": "y"})  # a memo
    store.put_key("bundle", "b" * 64, {"digest": sha(b"bundle"), "manifest": mid})
    store.put_key("bundle", "c" * 64, {"digest": sha(b"older bundle")})
    store.put_key("step", "a" * 64, {"manifest": cs.put(b"not a manifest")})  # unreachable
    junk = garbage(store)
    age_everything(store)
    removed = {(e.kind, e.name) for e in store.prune(None)}
    assert removed >= {
        ("key/source-sha256", "9" * 64),
        ("key/step", "a" * 64),
        ("key/bundle", "c" * 64),
    }
    assert not any(p.exists() for p in junk)
    left = {e.kind + " " + e.name for e in store.entries()}
    assert {
        f"key/{k} {n * 64}"
        for k, n in (
            ("step", "5"),
            ("step", "4"),
            ("spore", "3"),
            ("rootfs", "2"),
            ("initrd", "1"),
            ("guest-agent", "6"),
            ("bundle", "b"),
        )
    } <= left
    assert {f"blob {d}" for d in blobs} <= left  # rebuilding needs no registry
    assert f"kernel blake3:{kdir.name}" in left  # found by its vmlinux, without a record
    assert {f"guest {b3(b'initrd')}", f"guest {b3(b'agent')}"} <= left
    assert cs.has(str(earlier.memory.chunks[0]))  # the earlier step's snapshot
    restorable(store, s.parent)
    assert problems(store) == []


def test_young_records_keep_their_old_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    cs = ChunkStore(store)
    s = make_spores(tmp_path, 0, store=store)  # not registered: kept only through the record
    _, m, data = read_spore(str(s.parent))
    store.put_key("step", "5" * 64, {"manifest": cs.put(data)})
    age_everything(store)
    os.utime(store.root / "keys" / "step" / ("5" * 64 + ".json"))  # used just now
    assert store.prune(3600) == []
    mf.verify_chunks(m, cs, rehash=True)
    assert store.prune(None) and not any((store.root / "chunks" / "blake3").iterdir())
    assert problems(store) == []


# -- roots are judged strictly --------------------------------------------------------------


def _root_file(store: Store, name: str = "ab" * 32 + ".json") -> Path:
    return store.root / "roots" / name


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"format":"spore-root/v2"}',
        b"[]",
        b'{"format":"spore-root/v1","manifest":"blake3:' + b"a" * 64 + b'","path":"rel/x"}',
    ],
)
def test_an_invalid_root_record_stops_prune_and_fails_verify(tmp_path: Path, body: bytes) -> None:
    s = registered(tmp_path, 0)
    junk = garbage(s.store)
    _root_file(s.store).write_bytes(body)
    with pytest.raises(StoreError, match="is not a valid root record.*nothing was removed"):
        s.store.prune(None)
    assert all(p.exists() for p in junk)
    assert [p.kind for p in verify_store(s.store).fatal()] == ["corrupt"]


def test_a_record_under_another_name_or_a_linked_record_stops_prune(tmp_path: Path) -> None:
    s = registered(tmp_path, 0)
    (good,) = (s.store.root / "roots").iterdir()
    good.rename(_root_file(s.store))  # same bytes, name no longer its hash
    with pytest.raises(StoreError, match="its name is not the hash"):
        s.store.prune(None)
    _root_file(s.store).rename(good)
    outside = tmp_path / "outside.json"
    outside.write_bytes(good.read_bytes())
    _root_file(s.store).symlink_to(outside)  # never followed
    with pytest.raises(StoreError, match="symbolic link"):
        s.store.prune(None)


def test_a_root_that_cannot_be_read_stops_prune(tmp_path: Path) -> None:
    s = registered(tmp_path, 0)
    junk = garbage(s.store)
    idf = s.parent / "id"
    real = tmp_path / "id-elsewhere"
    real.write_bytes(idf.read_bytes())
    idf.unlink()
    idf.symlink_to(real)  # the right id, but through a link: never followed
    with pytest.raises(StoreError, match="cannot tell whether .* symbolic link"):
        s.store.prune(None)
    assert all(p.exists() for p in junk)
    assert [p.kind for p in verify_store(s.store).fatal()] == ["blocked"]


def test_verify_reports_a_live_spore_with_missing_objects(tmp_path: Path) -> None:
    s = registered(tmp_path, 0)
    _, m, _ = read_spore(str(s.parent))
    ChunkStore(s.store).path(m.memory.stored()[0]).unlink()
    (fatal,) = verify_store(s.store).fatal()
    assert fatal.kind == "broken" and "will not restore" in fatal.message


def test_root_record_decoding_is_strict_and_bounded() -> None:
    mid = "blake3:" + "c" * 64
    for path in ("/a/b.spore", "/ü/" + "x" * 100, '/a"b\\c'):
        r = Root(path, mid)
        assert storeroots.decode(storeroots.encode(r)) == r
    at = "/" + "x" * (storeroots.MAX_PATH - 1)
    assert storeroots.decode(storeroots.encode(Root(at, mid))).path == at
    assert (
        len(storeroots.encode(Root('/"' * (storeroots.MAX_PATH // 2), mid)))
        <= storeroots.MAX_RECORD
    )
    bad = [
        "/" + "x" * storeroots.MAX_PATH,
        "rel",
        "/",
        "/a//b",
        "/a/./b",
        "/a/../b",
        "/a/",
        "/a\nb",
        "/a\0b",
        "/\udcff",
    ]
    for path in bad:
        with pytest.raises(RootError):
            storeroots.decode(
                json.dumps(
                    {"format": "spore-root/v1", "manifest": mid, "path": path},
                    sort_keys=True,
                    separators=(",", ":"),
                ).encode()
            )
    good = storeroots.encode(Root("/a", mid))
    for data in (
        good.replace(b",", b", "),
        good + b"\n",
        good.replace(b'"/a"', b'"\\/a"'),
        b" " * (storeroots.MAX_RECORD + 1),
        good[:-1] + b',"path":"/b"}',
        good.replace(b"blake3:", b"sha256:"),
    ):
        with pytest.raises(RootError):
            storeroots.decode(data)


# -- the commands -----------------------------------------------------------------------------


def test_cache_keep_and_roots_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = make_spores(tmp_path, 1)
    monkeypatch.setenv("SPORE_HOME", str(s.store.root))
    assert main(["cache", "keep", str(s.parent), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {"path": str(s.parent.resolve()), "manifest_id": s.parent_id, "missing": 0}
    assert main(["cache", "roots"]) == 0
    assert capsys.readouterr().out.split() == ["live", str(s.parent.resolve()), s.parent_id]
    age_everything(s.store)
    assert main(["cache", "prune", "--all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["live_spores"] == 1 and doc["removed"] == 1  # the child's private chunk
    assert main(["cache", "verify"]) == 0
    restorable(s.store, s.parent)


def test_unpack_and_fork_record_their_spores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sporevm.dist.pack import pack, unpack

    s = make_spores(tmp_path / "src", 1)
    bundle = tmp_path / "b.bundle"
    pack(str(s.parent), s.children, bundle, s.store)
    node = Store(tmp_path / "node")
    unpack(str(bundle), tmp_path / "u.spore", node)
    monkeypatch.setenv("SPORE_HOME", str(node.root))
    assert (
        main(["fork", str(tmp_path / "u.spore"), "--count", "2", "--out", str(tmp_path / "forks")])
        == 0
    )
    capsys.readouterr()
    states = [
        (st.root.path if st.root else None, p.state if p else None)
        for st, p in storeroots.survey_store(node.root)
    ]
    spores = [
        tmp_path / "u.spore",
        tmp_path / "forks" / "child-0000.spore",
        tmp_path / "forks" / "child-0001.spore",
    ]
    assert sorted(states) == sorted((str(p), "live") for p in spores)
    age_everything(node)
    assert node.collect(None).live_spores == 3
    for p in spores:
        restorable(node, p)
    assert problems(node) == []


def test_records_that_do_not_parse_reach_nothing(tmp_path: Path) -> None:
    s = registered(tmp_path, 0)
    steps = s.store.root / "keys" / "step"
    steps.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(
        [
            b"[" * 200_000,
            b"{not json",
            b"1" * 10_000,
            b'"x"',
            b'{"manifest": 7}',
            b"{" + b" " * (1 << 20) + b"}",
        ]
    ):
        (steps / f"{i:064x}.json").write_bytes(body)
    age_everything(s.store)
    removed = s.store.prune(None)
    assert sorted(e.name for e in removed) == [f"{i:064x}" for i in range(6)]
    restorable(s.store, s.parent)
    assert problems(s.store) == []


def test_open_spore_passes_the_schema_once_per_manifest_and_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --from` pays jsonschema once per manifest: the store remembers which bytes
    passed it, and only those exact bytes under that very schema skip it."""
    s = make_spores(tmp_path, 1)
    schema_passes: list[str] = []
    real = mf._validate

    def counting(doc: dict[str, object], what: str) -> None:
        schema_passes.append(what)
        real(doc, what)

    monkeypatch.setattr(mf, "_validate", counting)
    first = open_spore(s.parent, s.store)
    assert open_spore(s.parent, s.store) == first
    assert len(schema_passes) == 1
    with pytest.raises(SporeOpenError, match="not in the store"):  # checked, then refused
        open_spore(s.parent, Store(tmp_path / "other-store"))  # another store: its own record
    assert len(schema_passes) == 2
    read_spore(str(s.parent))  # no store: always the full decode
    assert len(schema_passes) == 3
    monkeypatch.setattr(mf, "schema_fingerprint", lambda: "another-schema")
    assert open_spore(s.parent, s.store) == first  # a new schema checks the bytes again
    assert len(schema_passes) == 4
    # A record for other bytes vouches for nothing: edited bytes fail the id check first.
    (s.parent / "manifest.json").write_bytes((s.parent / "manifest.json").read_bytes() + b" ")
    with pytest.raises(SporeOpenError, match="manifest id is"):
        open_spore(s.parent, s.store)
