"""Spore bundles: format, canonical bytes, identity, pack/unpack of synthetic spores (no VM).

The spores here are made by hand (chunks in a real ChunkStore, a real rootfs
entry, canonical manifests), small enough that every check runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sporevm.dist import bundle, chunkpack, rootfs_artifact
from sporevm.dist.docjson import BundleError
from sporevm.dist.pack import pack, unpack
from sporevm.spore import blocktable
from sporevm.spore import manifest as mf
from sporevm.spore.chunks import CHUNK, MAX_OBJECT, ChunkStore, MemoryIndex
from sporevm.spore.sporedir import SporeOpenError, open_spore, read_spore
from sporevm.store import Store

SHA = "sha256:" + "cd" * 32
SEG = 40_000  # rootfs segment size in these tests: a 100 000-byte image -> 3 segments
ROOTFS_SIZE = 100_000
TABLE = 32 + 32 * -(-ROOTFS_SIZE // (64 << 10))  # its block table: 64 KiB blocks


def chunk_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "big") * (CHUNK // 4)


def spore_dir(path: Path, m: mf.Manifest) -> str:
    data = mf.encode(m)
    path.mkdir(parents=True)
    (path / "manifest.json").write_bytes(data)
    mid = mf.manifest_id(data)
    (path / "id").write_text(mid + "\n")
    return mid


@dataclass(frozen=True)
class Spores:
    store: Store
    parent: Path
    children: Path  # directory of child spores
    parent_id: str
    child_ids: tuple[str, ...]  # sorted
    private: dict[str, str]  # child id -> the chunk only it has


def make_spores(root: Path, n_children: int = 2, store: Store | None = None) -> Spores:
    """A parent (3 stored chunks + one zero chunk + a state object) and children that
    each replace the last chunk with a private one."""
    store = store or Store(root / "store")
    cs = ChunkStore(store)
    rootfs = root / "rootfs.img"
    rootfs.write_bytes(bytes(range(256)) * (ROOTFS_SIZE // 256) + b"x" * (ROOTFS_SIZE % 256))
    hashed = blocktable.install_rootfs(store, rootfs)  # as a build does: with its block table
    rdigest, rsize = hashed.digest, hashed.size
    table = mf.RootfsTable(cs.put(hashed.table), hashed.block_size)
    chunks = (cs.put(chunk_bytes(1)), None, cs.put(chunk_bytes(2)), cs.put(chunk_bytes(3)))
    state = cs.put(b'{"state":"vm"}')
    b3 = "blake3:" + "ab" * 32
    parent = mf.Manifest(
        platform=mf.PlatformContract(
            "x86_64", "kvm-pvm/v1", "spore-board/2", 4 * CHUNK, 1, b3, b3, "console=ttyS0"
        ),
        rootfs=mf.RootfsRef("ext4-immutable", rdigest, rsize, SHA, "spore-rootfs/1", 0, table),
        memory=MemoryIndex(CHUNK, chunks),
        state={"vm": mf.StateObject(state, 14)},
        generation=mf.Generation(str(uuid.uuid4()), None, 0, 1),
        annotations={"org.spore.name": "synthetic"},
        provenance=mf.Provenance(None, None, (), "sporevm/0.1.0"),
    )
    pid = spore_dir(root / "parent.spore", parent)
    private: dict[str, str] = {}
    for i in range(n_children):
        own = cs.put(chunk_bytes(100 + i))
        child = dataclasses.replace(
            parent,
            memory=MemoryIndex(CHUNK, (*chunks[:3], own)),
            generation=mf.Generation(str(uuid.uuid4()), pid, i, n_children),
        )
        private[spore_dir(root / "children" / f"child-{i}.spore", child)] = own
    return Spores(
        store, root / "parent.spore", root / "children", pid, tuple(sorted(private)), private
    )


@pytest.fixture
def spores(tmp_path: Path) -> Spores:
    return make_spores(tmp_path)


def do_pack(s: Spores, out: Path) -> str:
    return pack(
        str(s.parent), s.children, out, s.store, pack_limit=MAX_OBJECT, segment_limit=SEG
    ).digest


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- format --------------------------------------------------------------------------------


def test_schemas_are_valid_2020_12() -> None:
    for schema in (bundle.SCHEMA, chunkpack.SCHEMA, rootfs_artifact.SCHEMA):
        jsonschema.Draft202012Validator.check_schema(schema)


def test_layout_and_dedup(spores: Spores, tmp_path: Path) -> None:
    out = tmp_path / "b.bundle"
    res = pack(
        str(spores.parent),
        spores.children,
        out,
        spores.store,
        pack_limit=MAX_OBJECT,
        segment_limit=SEG,
    )
    names = set(tree(out))
    assert names == {
        "bundle.json",
        "chunkpack.index.json",
        "rootfs.index.json",
        *(bundle.manifest_name(m) for m in (spores.parent_id, *spores.child_ids)),
        "packs/000000.pack",
        "packs/000001.pack",
        "packs/000002.pack",
        "rootfs/000000.seg",
        "rootfs/000001.seg",
        "rootfs/000002.seg",
    }
    idx = chunkpack.decode((out / "chunkpack.index.json").read_bytes())
    # 3 parent chunks + state object + rootfs block table, then one private chunk per
    # child: each stored once.
    assert len(idx.objects) == 5 + 2 == res.objects
    assert sum(p.size for p in idx.packs) == 5 * CHUNK + 14 + TABLE
    assert [p.size for p in idx.packs] == [3 * CHUNK + 14 + TABLE, CHUNK, CHUNK]
    # a child's private chunk sits alone in its own pack
    for i, cid in enumerate(spores.child_ids, start=1):
        assert idx.contents(i) == [(spores.private[cid], chunkpack.Placement(i, 0, CHUNK))]
    doc = json.loads((out / "bundle.json").read_bytes())
    assert doc["parent"] == spores.parent_id and doc["children"] == list(spores.child_ids)
    rf = rootfs_artifact.decode((out / "rootfs.index.json").read_bytes())
    assert [s.size for s in rf.images[0].segments] == [SEG, SEG, ROOTFS_SIZE - 2 * SEG]


def test_reproducible(spores: Spores, tmp_path: Path) -> None:
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    assert do_pack(spores, a) == do_pack(spores, b)
    assert tree(a) == tree(b)
    files, digest = bundle.read_metadata(lambda n, lim: (a / n).read_bytes())
    assert digest == do_pack(spores, a)  # repacking in place: same digest


def test_identity_is_length_prefixed() -> None:
    # moving a byte from a path into the content must change the digest
    assert bundle.identity([("ab", b"c")]) != bundle.identity([("a", b"bc")])
    assert bundle.identity([("a", b"")]) != bundle.identity([("a", b""), ("", b"")])


def _meta(out: Path) -> list[tuple[str, bytes]]:
    return bundle.read_metadata(lambda n, lim: (out / n).read_bytes())[0]


@pytest.mark.parametrize("name", ["bundle.json", "chunkpack.index.json", "rootfs.index.json"])
def test_only_canonical_bytes(spores: Spores, tmp_path: Path, name: str) -> None:
    out = tmp_path / "b.bundle"
    do_pack(spores, out)
    data = (out / name).read_bytes()
    decode = {
        "bundle.json": bundle.decode,
        "chunkpack.index.json": chunkpack.decode,
        "rootfs.index.json": rootfs_artifact.decode,
    }[name]
    decode(data)
    doc = json.loads(data)
    for other in (
        data + b"\n",
        json.dumps(doc, sort_keys=True).encode(),
        json.dumps(doc, indent=1, sort_keys=True).encode(),
        json.dumps(dict(reversed(doc.items())), separators=(",", ":")).encode(),
    ):
        with pytest.raises(BundleError):
            decode(other)
    for bad, why in (
        (dict(doc, format=doc["format"][:-1] + "2"), "not supported"),
        (dict(doc, zz_extra=1), "zz_extra"),
        ({k: v for k, v in doc.items() if k != "format"}, "not supported"),
    ):
        with pytest.raises(BundleError, match=why):
            decode(json.dumps(bad, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(BundleError, match="duplicate key"):
        decode(data[:-1] + b',"format":"x"}')
    with pytest.raises(BundleError, match="larger than"):
        decode(b" " * (64 * 1024 * 1024 + 1))


def test_chunkpack_tiling_and_types() -> None:
    cid = "blake3:" + "11" * 32
    good = chunkpack.ChunkpackIndex(
        (chunkpack.Pack("packs/000000.pack", 10, SHA),), {cid: chunkpack.Placement(0, 0, 10)}
    )
    assert chunkpack.decode(chunkpack.encode(good)) == good
    doc = chunkpack.to_document(good)
    for objects, why in (
        ({cid: [0, 1, 9]}, "gap or overlap"),
        ({cid: [0, 0, 9]}, "cover"),
        ({cid: [1, 0, 10]}, "does not exist"),
        ({cid: [0, 0, True]}, "three"),
        ({cid: [0, 0]}, "three"),
        ({cid.upper(): [0, 0, 10]}, "not a chunk"),
    ):
        raw = json.dumps({**doc, "objects": objects}, sort_keys=True, separators=(",", ":"))
        with pytest.raises(BundleError, match=why):
            chunkpack.decode(raw.encode())
    wrong_name = {**doc, "packs": [{**doc["packs"][0], "name": "packs/000001.pack"}]}
    with pytest.raises(BundleError, match="must be 'packs/000000.pack'"):
        chunkpack.decode(json.dumps(wrong_name, sort_keys=True, separators=(",", ":")).encode())


def test_bundle_json_rules() -> None:
    a, b, c = ("blake3:" + x * 32 for x in ("aa", "bb", "cc"))
    for doc, why in (
        (bundle.BundleDoc(a, (b, b)), "sorted"),
        (bundle.BundleDoc(a, (a,)), "own"),
        (bundle.BundleDoc(a, (c, b)), "sorted"),
    ):
        with pytest.raises(BundleError, match=why):
            bundle.encode(doc)
    d = bundle.to_document(bundle.BundleDoc(a, (b,)))
    d["manifests"][b] = bundle.manifest_name(a)
    with pytest.raises(BundleError, match="manifests"):
        bundle.decode(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())


def test_cross_checks(spores: Spores, tmp_path: Path) -> None:
    out = tmp_path / "b.bundle"
    do_pack(spores, out)
    files = _meta(out)
    by = dict(files)
    cp = chunkpack.decode(by["chunkpack.index.json"])
    # an object no manifest uses
    extra = "blake3:" + "ee" * 32
    last = len(cp.packs)
    more = chunkpack.ChunkpackIndex(
        (*cp.packs, chunkpack.Pack(chunkpack.pack_name(last), 5, SHA)),
        {**cp.objects, extra: chunkpack.Placement(last, 0, 5)},
    )
    with pytest.raises(BundleError, match="no manifest uses"):
        bundle.assemble(
            [(n, chunkpack.encode(more) if n == "chunkpack.index.json" else d) for n, d in files]
        )
    # an object a manifest needs, missing
    fewer = chunkpack.ChunkpackIndex(
        cp.packs[:-1], {c: p for c, p in cp.objects.items() if p.pack < last - 1}
    )
    with pytest.raises(BundleError, match="is not packed"):
        bundle.assemble(
            [(n, chunkpack.encode(fewer) if n == "chunkpack.index.json" else d) for n, d in files]
        )
    # rootfs images must be exactly the manifests'
    rf = rootfs_artifact.RootfsIndex(())
    with pytest.raises(BundleError, match="images do not match"):
        bundle.assemble(
            [(n, rootfs_artifact.encode(rf) if n == "rootfs.index.json" else d) for n, d in files]
        )
    # a manifest whose bytes do not hash to its name
    name = bundle.manifest_name(spores.parent_id)
    with pytest.raises(BundleError, match="manifest id is"):
        bundle.assemble(
            [(n, d.replace(b"synthetic", b"synthetix") if n == name else d) for n, d in files]
        )


# -- pack / unpack ---------------------------------------------------------------------------


def test_unpack_child_installs_only_its_objects(spores: Spores, tmp_path: Path) -> None:
    out = tmp_path / "b.bundle"
    digest = do_pack(spores, out)
    clean = Store(tmp_path / "clean")
    child = spores.child_ids[1]
    res = unpack(f"{out}@{digest}", tmp_path / "c.spore", clean, child=child)
    assert res.manifest_id == child and res.digest == digest
    mid, m, _ = read_spore(str(tmp_path / "c.spore"))
    assert mid == child
    have = {"blake3:" + p.name for p in (clean.root / "chunks" / "blake3").iterdir()}
    assert have == set(bundle.objects_of(m, "child"))
    assert spores.private[spores.child_ids[0]] not in have
    opened, _, rootfs = open_spore(tmp_path / "c.spore", clean)  # what `spore run --from` does
    assert (
        opened == m
        and rootfs.read_bytes() == (spores.store.rootfs_path(m.rootfs.digest)).read_bytes()
    )
    mf.verify_chunks(m, ChunkStore(clean), rehash=True)
    assert not list((clean.root / "tmp").iterdir())  # staging cleaned up


def test_unpack_refuses_wrong_pin_and_unknown_child(spores: Spores, tmp_path: Path) -> None:
    out = tmp_path / "b.bundle"
    do_pack(spores, out)
    clean = Store(tmp_path / "clean")
    with pytest.raises(BundleError, match="pinned"):
        unpack(f"{out}@sha256:{'0' * 64}", tmp_path / "x.spore", clean)
    with pytest.raises(BundleError, match="not a child"):
        unpack(str(out), tmp_path / "x.spore", clean, child="blake3:" + "0" * 64)
    assert not (tmp_path / "x.spore").exists()
    (tmp_path / "x.spore").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        unpack(str(out), tmp_path / "x.spore", clean)


def test_pack_refuses_edited_spore_and_missing_chunk(spores: Spores, tmp_path: Path) -> None:
    mpath = spores.parent / "manifest.json"
    original = mpath.read_bytes()
    mpath.write_bytes(original.replace(b"synthetic", b"synthetix"))
    with pytest.raises(SporeOpenError, match="manifest id is"):
        do_pack(spores, tmp_path / "b.bundle")
    mpath.write_bytes(original)
    _, m, _ = read_spore(str(spores.parent))
    victim = ChunkStore(spores.store).path(m.memory.stored()[0])
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(Exception, match="corrupt"):
        do_pack(spores, tmp_path / "b.bundle")
    assert not (tmp_path / "b.bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_pack_limit_bounds() -> None:
    with pytest.raises(BundleError):
        chunkpack.plan([], limit=MAX_OBJECT - 1)
    # objects larger than the remaining room start a new pack; duplicates are dropped
    a, b = "blake3:" + "aa" * 32, "blake3:" + "bb" * 32
    assert chunkpack.plan([[(a, MAX_OBJECT)], [(a, MAX_OBJECT), (b, 1)]], MAX_OBJECT) == [
        [(a, MAX_OBJECT)],
        [(b, 1)],
    ]


def test_cli_pack_and_unpack(
    spores: Spores,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sporevm.cli import main

    monkeypatch.setenv("SPORE_HOME", str(spores.store.root))
    out = tmp_path / "cli.bundle"
    assert (
        main(
            [
                "pack",
                str(spores.parent),
                "--children",
                str(spores.children),
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["digest"].startswith("sha256:") and doc["children"] == list(spores.child_ids)
    monkeypatch.setenv("SPORE_HOME", str(tmp_path / "other"))
    assert (
        main(
            [
                "unpack",
                f"{out}@{doc['digest']}",
                "--child",
                spores.child_ids[0],
                "--out",
                str(tmp_path / "u.spore"),
            ]
        )
        == 0
    )
    assert read_spore(str(tmp_path / "u.spore"))[0] == spores.child_ids[0]
    assert main(["unpack", f"{out}@sha256:{'1' * 64}", "--out", str(tmp_path / "v")]) == 1
    assert "pinned" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "v")


def _users_dir(root: Path) -> dict[str, bytes]:
    (root / "src").mkdir(parents=True)
    (root / "thesis.txt").write_text("thesis")
    (root / "src" / "main.c").write_text("int main;")
    return tree(root)


def test_cli_pack_out_never_replaces_a_users_directory(
    spores: Spores,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`spore pack --out v` with v a directory of the user's: refused, v untouched."""
    from sporevm.cli import main

    monkeypatch.setenv("SPORE_HOME", str(spores.store.root))
    v = tmp_path / "v"
    before = _users_dir(v)
    assert main(["pack", str(spores.parent), "--out", str(v)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"spore: error: {v}: exists and is not a bundle directory (")
    assert err.count("\n") == 1 and tree(v) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []
    # over an earlier bundle, and over an empty directory, it is replaced
    b = tmp_path / "b"
    assert main(["pack", str(spores.parent), "--out", str(b)]) == 0
    assert (
        main(["pack", str(spores.parent), "--children", str(spores.children), "--out", str(b)]) == 0
    )
    assert len(list((b / "manifests").iterdir())) == 3
    (tmp_path / "empty").mkdir()
    assert main(["pack", str(spores.parent), "--out", str(tmp_path / "empty")]) == 0


def test_cli_fork_out_never_replaces_a_users_directory(
    spores: Spores,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sporevm.cli import main

    monkeypatch.setenv("SPORE_HOME", str(spores.store.root))
    out = tmp_path / "forks"
    before = _users_dir(out / "child-0000.spore")
    assert main(["fork", str(spores.parent), "--count", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "child-0000.spore: exists and is not a spore directory (holds 'src'" in err
    assert tree(out / "child-0000.spore") == before
    assert main(["fork", str(spores.parent), "--count", "2", "--out", str(tmp_path / "f2")]) == 0
    assert main(["fork", str(spores.parent), "--count", "2", "--out", str(tmp_path / "f2")]) == 0


def test_sporefile_push_list(tmp_path: Path) -> None:
    from sporevm import sporefile
    from sporevm.errors import SporefileError
    from sporevm.pipeline.driver import check_push_uris

    head = "sporefile: 1\nname: app\nbase: {image: busybox}\n"
    sf = sporefile.loads(
        head + "push: [oci://127.0.0.1:5000/spores/app, file:///srv/b]\n", tmp_path / "Sporefile"
    )
    assert sf.push == ("oci://127.0.0.1:5000/spores/app", "file:///srv/b")
    check_push_uris(sf)
    assert sporefile.loads(head, tmp_path / "Sporefile").push == ()
    with pytest.raises(SporefileError, match="push"):
        sporefile.loads(head + "push: [http://example.com/b]\n", tmp_path / "Sporefile")
    bad = sporefile.loads(head + "push: [file://relative/b]\n", tmp_path / "Sporefile")
    with pytest.raises(SporefileError, match=r"push\.0"):
        check_push_uris(bad)


def test_cli_inspect_and_verify_bundle(
    spores: Spores,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sporevm.cli import main

    monkeypatch.setenv("SPORE_HOME", str(tmp_path / "home"))
    out = tmp_path / "b.bundle"
    digest = do_pack(spores, out)
    assert main(["inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["digest"], doc["parent"], doc["objects"]) == (digest, spores.parent_id, 7)
    assert main(["verify", f"{out}@{digest}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["bytes_verified"] == 5 * CHUNK + 14 + TABLE + ROOTFS_SIZE
    # a pack whose sha256 is right but whose object does not hash to its id cannot be made
    # without breaking sha256; flip a byte and verify names the pack
    pk = out / "packs" / "000001.pack"
    data = pk.read_bytes()
    pk.write_bytes(data[:7] + bytes([data[7] ^ 4]) + data[8:])
    assert main(["verify", str(out)]) == 1
    assert "packs/000001.pack" in capsys.readouterr().err
    assert main(["inspect", f"{out}@sha256:{'2' * 64}"]) == 1
    assert "pinned" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 40), st.integers(0, MAX_OBJECT)), max_size=12), max_size=5
    )
)
def test_plan_places_each_object_once_and_round_trips(groups: list[list[tuple[int, int]]]) -> None:
    sizes: dict[str, int] = {}
    named: list[list[tuple[str, int]]] = []
    for g in groups:
        named.append([])
        for n, size in g:
            cid = "blake3:" + f"{n:064x}"
            size = sizes.setdefault(cid, size)  # one id, one size
            named[-1].append((cid, size))
    layout = chunkpack.plan(named, MAX_OBJECT)
    placed = [cid for pack_ in layout for cid, _ in pack_]
    assert sorted(placed) == sorted(sizes) and len(placed) == len(set(placed))
    assert all(sum(s for _, s in p) <= MAX_OBJECT or len(p) == 1 for p in layout)
    objects = {
        cid: chunkpack.Placement(i, off, size)
        for i, p in enumerate(layout)
        for cid, size, off in ((c, s, sum(x for _, x in p[:j])) for j, (c, s) in enumerate(p))
    }
    index = chunkpack.ChunkpackIndex(
        tuple(
            chunkpack.Pack(chunkpack.pack_name(i), sum(s for _, s in p), SHA)
            for i, p in enumerate(layout)
        ),
        objects,
    )
    assert chunkpack.decode(chunkpack.encode(index)) == index
