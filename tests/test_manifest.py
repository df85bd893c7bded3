"""The spore/v1 manifest: one canonical byte form, strict decoding, platform and chunk checks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sporevm.spore import manifest as mf
from sporevm.spore import platform
from sporevm.spore.chunks import CHUNK, ChunkStore, MemoryIndex, chunk_id, snapshot_memory
from sporevm.store import Store

B3 = "blake3:" + "ab" * 32
SHA = "sha256:" + "cd" * 32


def sample(chunks: tuple[str | None, ...] = (None, B3)) -> mf.Manifest:
    return mf.Manifest(
        platform=mf.PlatformContract(
            arch="x86_64",
            cpu_profile="kvm-pvm/v1",
            device_model="spore-board/2",
            memory=len(chunks) * CHUNK,
            vcpus=1,
            kernel=B3,
            initrd=B3,
            cmdline="console=ttyS0 quiet",
        ),
        rootfs=mf.RootfsRef(
            kind="ext4-immutable",
            digest=B3,
            size=1 << 20,
            source_image=SHA,
            builder="spore-rootfs/1",
            blk_slot=0,
        ),
        memory=MemoryIndex(CHUNK, chunks),
        state={"vcpu/0": mf.StateObject(B3, 4096), "vm": mf.StateObject(B3, 100)},
        generation=mf.Generation(
            id="0f8fad5b-d9cb-469f-a165-70867728950e", parent=None, index=0, count=1
        ),
        annotations={"org.example/purpose": "tests ✓"},
        provenance=mf.Provenance(
            sporefile=B3, lock=None, steps=("0" * 64,), builder="sporevm/0.1.0"
        ),
    )


def doc() -> dict[str, Any]:
    return mf.to_document(sample())


def raw(d: dict[str, Any]) -> bytes:
    return mf.canonical(d)


def test_schema_is_valid_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(mf.SCHEMA)


def test_chunk_entry_cannot_pose_as_two() -> None:
    d = doc()
    d["memory"]["chunks"] = [B3 + "\n" + B3]
    d["platform"]["memory"] = CHUNK
    with pytest.raises(mf.ManifestError, match="memory.chunks.0"):
        mf.decode(raw(d))
    d["memory"]["chunks"] = [1]
    with pytest.raises(mf.ManifestError, match="memory.chunks.0"):
        mf.decode(raw(d))


def test_roundtrip_and_identity() -> None:
    m = sample()
    data = mf.encode(m)
    assert mf.decode(data) == m
    assert mf.encode(mf.decode(data)) == data
    assert mf.manifest_id(data).startswith("blake3:")
    assert b" " not in data.replace(b"console=ttyS0 quiet", b"").replace(b"tests \xe2", b"")
    assert "tests ✓".encode() in data  # raw UTF-8, not \u escapes
    keys = list(json.loads(data))
    assert keys == sorted(keys)


def test_generation_changes_identity() -> None:
    a = mf.encode(sample())
    m = sample()
    b = mf.encode(
        dataclasses.replace(
            m,
            generation=mf.Generation(
                "6ba7b810-9dad-41d1-80b4-00c04fd430c8", mf.manifest_id(a), 1, 2
            ),
        )
    )
    assert mf.manifest_id(a) != mf.manifest_id(b)
    assert mf.decode(b).generation.parent == mf.manifest_id(a)


@pytest.mark.parametrize(
    "variant",
    [
        lambda b: json.dumps(json.loads(b), indent=1).encode(),
        lambda b: json.dumps(json.loads(b), sort_keys=True).encode(),  # ", " and ": "
        lambda b: json.dumps(json.loads(b), sort_keys=True, separators=(",", ":")).encode(),  # \u
        lambda b: b + b"\n",
        lambda b: b"\xef\xbb\xbf" + b,
        lambda b: json.dumps(
            dict(reversed(json.loads(b).items())), separators=(",", ":"), ensure_ascii=False
        ).encode(),
    ],
)
def test_only_canonical_bytes_accepted(variant: Any) -> None:
    data = mf.encode(sample())
    other = variant(data)
    assert other != data
    with pytest.raises(mf.ManifestError):
        mf.decode(other)


def test_escaped_integer_forms_rejected() -> None:
    data = mf.encode(sample()).replace(b'"vcpus":1', b'"vcpus":1e0')
    with pytest.raises(mf.ManifestError, match="not an integer"):
        mf.decode(data)
    data = mf.encode(sample()).replace(b'"vcpus":1', b'"vcpus":1.0')
    with pytest.raises(mf.ManifestError, match="not an integer"):
        mf.decode(data)
    data = mf.encode(sample()).replace(b'"vcpus":1', b'"vcpus":01')
    with pytest.raises(mf.ManifestError, match="invalid JSON"):
        mf.decode(data)


def test_unknown_version() -> None:
    d = doc()
    d["format"] = "spore/v2"
    with pytest.raises(mf.ManifestError, match="'spore/v2' is not supported"):
        mf.decode(raw(d))
    del d["format"]
    with pytest.raises(mf.ManifestError, match="not supported"):
        mf.decode(raw(d))


@pytest.mark.parametrize(
    "path",
    [
        (),
        ("platform",),
        ("rootfs",),
        ("memory",),
        ("state",),
        ("state", "objects", "vm"),
        ("generation",),
        ("provenance",),
    ],
)
def test_unknown_field_at_each_level(path: tuple[str, ...]) -> None:
    d = doc()
    target = d
    for p in path:
        target = target[p]
    target["zz_extra"] = 1
    with pytest.raises(mf.ManifestError, match="zz_extra"):
        mf.decode(raw(d))


@pytest.mark.parametrize(
    "section", ["platform", "rootfs", "memory", "state", "generation", "annotations", "provenance"]
)
def test_missing_section(section: str) -> None:
    d = doc()
    del d[section]
    with pytest.raises(mf.ManifestError, match=section):
        mf.decode(raw(d))


@pytest.mark.parametrize(
    "field",
    ["arch", "cpu_profile", "device_model", "memory", "vcpus", "kernel", "initrd", "cmdline"],
)
def test_missing_platform_field(field: str) -> None:
    d = doc()
    del d["platform"][field]
    with pytest.raises(mf.ManifestError, match=field):
        mf.decode(raw(d))


def test_duplicate_keys() -> None:
    data = mf.encode(sample()).replace(b'{"arch":', b'{"arch":"x86_64","arch":', 1)
    with pytest.raises(mf.ManifestError, match="duplicate key 'arch'"):
        mf.decode(data)


@pytest.mark.parametrize(
    "bad",
    [
        ("platform", "kernel", "blake3:" + "AB" * 32),
        ("platform", "initrd", "sha256:" + "ab" * 32),
        ("platform", "kernel", B3 + "\n"),
        ("rootfs", "digest", "blake3:abc"),
        ("rootfs", "source_image", B3),
        ("generation", "parent", "blake3:"),
        ("provenance", "sporefile", SHA),
        ("provenance", "lock", "blake3:" + "g" * 64),
    ],
)
def test_bad_digests(bad: tuple[str, str, str]) -> None:
    section, field, value = bad
    d = doc()
    d[section][field] = value
    with pytest.raises(mf.ManifestError, match=f"{section}.{field}"):
        mf.decode(raw(d))


def test_bad_chunk_and_object_digests() -> None:
    d = doc()
    d["memory"]["chunks"][1] = "blake3:zz"
    with pytest.raises(mf.ManifestError, match="memory.chunks.1"):
        mf.decode(raw(d))
    d = doc()
    d["state"]["objects"]["vm"]["digest"] = SHA
    with pytest.raises(mf.ManifestError, match="state.objects.vm.digest"):
        mf.decode(raw(d))


@pytest.mark.parametrize(
    "bad",
    [
        ("platform", "arch", "aarch64"),
        ("platform", "vcpus", 0),
        ("platform", "vcpus", True),
        ("platform", "vcpus", "1"),
        ("platform", "memory", CHUNK + 4096),
        ("platform", "memory", 0),
        ("platform", "cmdline", "a\nb"),
        ("platform", "cmdline", "x" * 4097),
        ("platform", "cpu_profile", "KVM"),
        ("rootfs", "kind", "ext4"),
        ("rootfs", "blk_slot", 1),
        ("rootfs", "size", -1),
        ("memory", "chunk_size", 4096),
        ("generation", "id", "not-a-uuid"),
        ("generation", "id", "0f8fad5b-d9cb-169f-a165-70867728950e"),  # uuid1
        ("generation", "count", 0),
        ("provenance", "steps", ["xyz"]),
        ("provenance", "steps", "0" * 64),
    ],
)
def test_bad_values(bad: tuple[str, str, Any]) -> None:
    section, field, value = bad
    d = doc()
    d[section][field] = value
    with pytest.raises(mf.ManifestError, match=f"{section}.{field}"):
        mf.decode(raw(d))


def test_wrong_chunk_count() -> None:
    d = doc()
    d["memory"]["chunks"].append(None)
    with pytest.raises(mf.ManifestError, match="3 entries.*needs exactly 2"):
        mf.decode(raw(d))
    with pytest.raises(mf.ManifestError, match="needs exactly"):
        mf.encode(dataclasses.replace(sample(), memory=MemoryIndex(CHUNK, (None,))))


def test_generation_index_below_count() -> None:
    d = doc()
    d["generation"]["index"] = 1
    with pytest.raises(mf.ManifestError, match="index 1 is not below count 1"):
        mf.decode(raw(d))


def test_annotations_bounded() -> None:
    d = doc()
    d["annotations"] = {f"k{i}": "v" for i in range(mf.MAX_ANNOTATIONS + 1)}
    with pytest.raises(mf.ManifestError, match="annotations"):
        mf.decode(raw(d))
    d["annotations"] = {"bad key": "v"}
    with pytest.raises(mf.ManifestError, match="annotations"):
        mf.decode(raw(d))
    d["annotations"] = {"k": 1}
    with pytest.raises(mf.ManifestError, match="annotations.k"):
        mf.decode(raw(d))


def test_state_object_names() -> None:
    d = doc()
    d["state"]["objects"]["../x"] = {"digest": B3, "size": 1}
    with pytest.raises(mf.ManifestError, match="state.objects"):
        mf.decode(raw(d))


def test_malformed_input() -> None:
    for data in (
        b"",
        b"[]",
        b"{",
        b"\xff\xfe",
        b'{"format":"spore/v1"}',
        b"null",
        b"[" * 100000 + b"]" * 100000,
        b'{"a":' + b"9" * 5000 + b"}",
    ):
        with pytest.raises(mf.ManifestError):
            mf.decode(data)
    with pytest.raises(mf.ManifestError, match="larger than"):
        mf.decode(b" " * (mf.MAX_MANIFEST + 1))


def test_lone_surrogate_rejected() -> None:
    data = mf.encode(sample()).replace("tests ✓".encode(), b"\\ud800")
    with pytest.raises(mf.ManifestError):
        mf.decode(data)
    bad = dataclasses.replace(sample(), annotations={"k": "\ud800"})
    with pytest.raises(mf.ManifestError, match="canonically"):
        mf.encode(bad)


def test_encode_refuses_invalid() -> None:
    bad = dataclasses.replace(sample(), rootfs=dataclasses.replace(sample().rootfs, blk_slot=2))
    with pytest.raises(mf.ManifestError, match="rootfs.blk_slot"):
        mf.encode(bad)


def test_check_platform_each_field() -> None:
    m = sample()
    mf.check_platform(m, m.platform)
    other: dict[str, Any] = {
        "arch": "aarch64",
        "cpu_profile": "kvm/v1",
        "device_model": "spore-board/3",
        "memory": 4 * CHUNK,
        "vcpus": 2,
        "kernel": "blake3:" + "00" * 32,
        "initrd": "blake3:" + "11" * 32,
        "cmdline": "console=ttyS0",
    }
    for field, value in other.items():
        host = dataclasses.replace(m.platform, **{field: value})
        with pytest.raises(mf.PlatformMismatchError, match=rf"^spore needs platform\.{field} ="):
            mf.check_platform(m, host)
    # the first differing field is the one named
    host = dataclasses.replace(m.platform, vcpus=8, kernel="blake3:" + "00" * 32)
    with pytest.raises(mf.PlatformMismatchError, match="platform.vcpus"):
        mf.check_platform(m, host)


def with_model(m: mf.Manifest, model: str, network: tuple[str, ...] | None = None) -> mf.Manifest:
    return dataclasses.replace(
        m, platform=dataclasses.replace(m.platform, device_model=model), network=network
    )


@pytest.mark.parametrize(
    ("model", "network"),
    [
        ("spore-board/1", None),
        ("spore-board-net/1", ("a.test",)),
        (platform.DEVICE_MODEL, None),
        (platform.DEVICE_MODEL_NET, ("a.test",)),
    ],
)
def test_every_restorable_device_model_restores_on_a_host_building_the_new_one(
    model: str, network: tuple[str, ...] | None
) -> None:
    """A host builds /2 and restores /1 too: spores pinned by id survive an upgrade."""
    m = mf.decode(mf.encode(with_model(sample(), model, network)))
    assert m.platform.device_model == model
    host = dataclasses.replace(
        m.platform, device_model=platform.device_model(net=network is not None)
    )
    mf.check_platform(m, host)
    assert platform.BOARD_MODELS[model].legacy_console == model.endswith("/1")


def test_restorable_device_models_are_explicit() -> None:
    assert set(platform.BOARD_MODELS) == {
        "spore-board/1",
        "spore-board-net/1",
        "spore-board/2",
        "spore-board-net/2",
    }
    assert platform.device_model(False) == "spore-board/2"  # new builds: /2 only
    assert platform.device_model(True) == "spore-board-net/2"


@pytest.mark.parametrize("model", ["spore-board/0", "spore-board/3", "spore-board-net/9", "x/1"])
def test_unknown_device_model_is_refused_in_one_line(model: str) -> None:
    m = with_model(sample(), model)
    host = dataclasses.replace(m.platform, device_model=platform.DEVICE_MODEL)
    with pytest.raises(mf.PlatformMismatchError) as exc:
        mf.check_platform(m, host)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"spore needs platform.device_model = {model!r}")
    assert "spore-board/1" in msg and "spore-board/2" in msg  # what this host restores


def test_legacy_device_model_keeps_the_nic_rules() -> None:
    host = dataclasses.replace(sample().platform, device_model=platform.DEVICE_MODEL)
    with pytest.raises(mf.PlatformMismatchError, match="^the spore has a NIC"):
        mf.check_platform(with_model(sample(), "spore-board-net/1", ("a.test",)), host)
    net_host = dataclasses.replace(host, device_model=platform.DEVICE_MODEL_NET)
    with pytest.raises(mf.PlatformMismatchError, match="^the spore has no NIC"):
        mf.check_platform(with_model(sample(), "spore-board/1"), net_host)
    with pytest.raises(mf.ManifestError, match="spore-board-net/1 needs a network: entry"):
        mf.encode(with_model(sample(), "spore-board-net/1"))
    with pytest.raises(mf.ManifestError, match="needs platform.device_model"):
        mf.encode(with_model(sample(), "spore-board/1", ("a.test",)))


@pytest.fixture
def cs(tmp_path: Path) -> ChunkStore:
    return ChunkStore(Store(tmp_path / "store"))


def stored_manifest(cs: ChunkStore) -> mf.Manifest:
    ram = bytearray(3 * CHUNK)
    ram[CHUNK:] = os.urandom(2 * CHUNK)
    idx = snapshot_memory(memoryview(ram), cs)
    vm = cs.put(b"vm state")
    m = sample(idx.chunks)
    return dataclasses.replace(m, state={"vm": mf.StateObject(vm, 8)})


def test_verify_chunks(cs: ChunkStore) -> None:
    m = stored_manifest(cs)
    mf.verify_chunks(m, cs)
    mf.verify_chunks(m, cs, rehash=False)


def test_verify_chunks_missing(cs: ChunkStore) -> None:
    m = stored_manifest(cs)
    assert m.memory.chunks[2] is not None
    cs.path(m.memory.chunks[2]).unlink()
    with pytest.raises(mf.ManifestError, match="memory chunk 2 .* is missing"):
        mf.verify_chunks(m, cs, rehash=False)


def test_verify_chunks_corrupt(cs: ChunkStore) -> None:
    m = stored_manifest(cs)
    assert m.memory.chunks[1] is not None
    cs.path(m.memory.chunks[1]).write_bytes(bytes(CHUNK))
    mf.verify_chunks(m, cs, rehash=False)  # presence only
    with pytest.raises(mf.ManifestError, match="memory chunk 1 .*corrupt"):
        mf.verify_chunks(m, cs)
    assert not cs.has(m.memory.chunks[1])


def test_verify_state_objects(cs: ChunkStore) -> None:
    m = stored_manifest(cs)
    wrong = dataclasses.replace(m, state={"vm": mf.StateObject(m.state["vm"].digest, 9)})
    with pytest.raises(mf.ManifestError, match="state object 'vm'.*expected 9"):
        mf.verify_chunks(wrong, cs)
    assert cs.has(m.state["vm"].digest)  # a lying manifest cannot evict good content
    missing = dataclasses.replace(m, state={"vm": mf.StateObject(chunk_id(b"nope"), 4)})
    with pytest.raises(mf.ManifestError, match="state object 'vm'.*missing"):
        mf.verify_chunks(missing, cs)


def test_decode_vouched_accepts_only_the_vouched_bytes() -> None:
    data = mf.encode(sample())
    mid = mf.manifest_id(data)
    assert mf.decode_vouched(data, mid) == mf.decode(data)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(mf.ManifestError, match="changed since it was checked"):
        mf.decode_vouched(bytes(flipped), mid)
    with pytest.raises(mf.ManifestError, match="changed since it was checked"):
        mf.decode_vouched(data, "blake3:" + "0" * 64)


def test_id_of_a_decoded_manifest_is_the_id_of_its_bytes() -> None:
    data = mf.encode(sample())
    assert mf.id_of(mf.decode(data)) == mf.manifest_id(data)


# -- rootfs.table: the block table (optional; absent in spores sealed before it) -------------


def with_table(m: mf.Manifest, digest: str = B3, block_size: int = 65536) -> mf.Manifest:
    return dataclasses.replace(
        m, rootfs=dataclasses.replace(m.rootfs, table=mf.RootfsTable(digest, block_size))
    )


def test_table_roundtrips_and_is_absent_not_null_without_one() -> None:
    plain = sample()
    assert b'"table"' not in mf.encode(plain)  # older spores keep their bytes and ids
    m = with_table(plain)
    data = mf.encode(m)
    assert b'"table":{"block_size":65536,"digest":"' + B3.encode() in data
    assert mf.decode(data) == m
    assert mf.decode_vouched(data, mf.manifest_id(data)) == m
    assert mf.manifest_id(data) != mf.manifest_id(mf.encode(plain))


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (None, "rootfs.table"),  # null is not absent
        ({"digest": B3}, "block_size"),
        ({"digest": B3, "block_size": 65536, "root": B3}, "Additional properties"),
        ({"digest": "blake3:AB", "block_size": 65536}, "rootfs.table.digest"),
        ({"digest": B3, "block_size": 65536.0}, "integers only"),
        ({"digest": B3, "block_size": 2048}, "rootfs.table.block_size"),
        ({"digest": B3, "block_size": 3 * 4096}, "power of two"),
        ({"digest": B3, "block_size": 32 << 20}, "rootfs.table.block_size"),
    ],
)
def test_bad_tables_are_refused(table: Any, match: str) -> None:
    d = doc()
    d["rootfs"]["table"] = table
    data = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    with pytest.raises(mf.ManifestError, match=match):
        mf.decode(data)


def test_a_table_too_large_for_the_image_is_refused() -> None:
    m = with_table(sample(), block_size=4096)
    big = dataclasses.replace(m, rootfs=dataclasses.replace(m.rootfs, size=1 << 40))
    with pytest.raises(mf.ManifestError, match="larger block size"):
        mf.encode(big)


def test_rootfs_table_is_fetched_checked_and_counted(cs: ChunkStore, tmp_path: Path) -> None:
    from sporevm.spore import blocktable

    img = tmp_path / "img"
    img.write_bytes(os.urandom(200_000))
    fd = os.open(img, os.O_RDONLY)
    try:
        h = blocktable.hash_image(fd, 65536)
    finally:
        os.close(fd)
    tid = cs.put(h.table)
    base = stored_manifest(cs)
    m = with_table(
        dataclasses.replace(base, rootfs=dataclasses.replace(base.rootfs, size=200_000)), tid
    )
    assert mf.rootfs_table(base, cs) is None
    t = mf.rootfs_table(m, cs)
    assert t is not None and t.blocks == 4 and t.image_size == 200_000
    assert (tid, len(h.table), f"rootfs block table ({tid})") in mf.objects(m)
    mf.verify_chunks(m, cs)
    # A manifest that says another block size or image size cannot use this table.
    for wrong in (
        with_table(m, tid, 4096),
        dataclasses.replace(m, rootfs=dataclasses.replace(m.rootfs, size=200_001)),
    ):
        with pytest.raises(mf.ManifestError, match="rootfs block table"):
            mf.rootfs_table(wrong, cs)
    cs.path(tid).write_bytes(h.table[:-1] + b"\0")  # rot: re-hashed against the manifest
    with pytest.raises(mf.ManifestError, match="rootfs block table .*corrupt"):
        mf.rootfs_table(m, cs)
    with pytest.raises(mf.ManifestError, match="rootfs block table .*missing"):
        mf.verify_chunks(m, cs, rehash=False)
