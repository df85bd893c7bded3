"""Fuzz a pull end to end: damaged packs, rootfs segments and node-cache entries.

A small spore (one stored chunk, one zero chunk, a state object, a 3-segment
rootfs) is packed once into a pristine file:// bundle. Each input picks a file
of that bundle (a pack or a segment) or an entry of the puller's node cache and
damages it (flip, truncate, extend, replace, or a symlink in the cache), then
pulls the parent into an empty output. Only SporeError may escape; a failed pull
leaves no output; a successful one produced a spore whose every chunk and whose
rootfs re-verify from the store. Metadata damage is fuzzed by the bundle and
chunkpack targets: here the pin stays right, so the bytes reach the pack paths.
"""

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.dist.pack import pack
    from sporevm.dist.pull import pull
    from sporevm.dist.transports import open_source
    from sporevm.dist.uri import parse_pull_uri
    from sporevm.errors import SporeError
    from sporevm.spore import manifest as mf
    from sporevm.spore.chunks import CHUNK, MAX_OBJECT, ChunkStore, MemoryIndex
    from sporevm.spore.sporedir import open_spore, write_spore
    from sporevm.store import Store, blake3_file

ROOTFS_SIZE = 30_000
SEGMENT = 12_000  # -> 3 rootfs segments
B3 = "blake3:" + "ab" * 32


def _pristine(root: Path) -> tuple[Path, str]:
    """(bundle directory, pinned file:// reference) of a freshly packed small spore."""
    store = Store(root / "src-store")
    cs = ChunkStore(store)
    image = root / "rootfs.img"
    image.write_bytes(bytes(range(251)) * (ROOTFS_SIZE // 251) + b"r" * (ROOTFS_SIZE % 251))
    rdigest, rsize = store.install_rootfs(image)
    chunk = cs.put((7).to_bytes(4, "big") * (CHUNK // 4))
    state = cs.put(b'{"state":"vm"}')
    m = mf.Manifest(
        platform=mf.PlatformContract(
            "x86_64", "kvm-pvm/v1", "spore-board/1", 2 * CHUNK, 1, B3, B3, "console=ttyS0"
        ),
        rootfs=mf.RootfsRef(
            "ext4-immutable", rdigest, rsize, "sha256:" + "cd" * 32, "spore-rootfs/1", 0
        ),
        memory=MemoryIndex(CHUNK, (chunk, None)),
        state={"vm": mf.StateObject(state, 14)},
        generation=mf.Generation(str(uuid.UUID(int=1, version=4)), None, 0, 1),
        annotations={"org.spore.name": "fuzz"},
        provenance=mf.Provenance(None, None, (), "sporevm/0.1.0"),
    )
    write_spore(m, root / "parent.spore")
    res = pack(
        str(root / "parent.spore"),
        None,
        root / "pristine.bundle",
        store,
        pack_limit=MAX_OBJECT,
        segment_limit=SEGMENT,
    )
    return root / "pristine.bundle", res.digest


WORK = Path(tempfile.mkdtemp(prefix="spore-fuzz-pull-"))
atexit.register(shutil.rmtree, WORK, True)
PRISTINE, DIGEST = _pristine(WORK)
TARGETS = sorted(
    str(p.relative_to(PRISTINE))
    for p in PRISTINE.rglob("*")
    if p.is_file() and p.name.endswith((".pack", ".seg"))
)


def _damage(fdp: "atheris.FuzzedDataProvider", data: bytes) -> bytes:
    op = fdp.ConsumeIntInRange(0, 3)
    if op == 0 and data:  # flip bits at one offset
        i = fdp.ConsumeIntInRange(0, len(data) - 1)
        return data[:i] + bytes([data[i] ^ (fdp.ConsumeIntInRange(1, 255))]) + data[i + 1 :]
    if op == 1:  # truncate
        return data[: fdp.ConsumeIntInRange(0, len(data))]
    if op == 2:  # extend
        return data + bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096)))
    return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 65536)))  # replace


def TestOneInput(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    case = Path(tempfile.mkdtemp(dir=WORK))
    try:
        remote = case / "remote.bundle"
        shutil.copytree(PRISTINE, remote, copy_function=os.link)
        store = Store(case / "store")
        where = fdp.ConsumeIntInRange(0, 2)
        if where < 2:  # damage a bundle file (a fresh file: the pristine one is hard-linked)
            name = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
            damaged = _damage(fdp, (remote / name).read_bytes())
            (remote / name).unlink()
            (remote / name).write_bytes(damaged)
        else:  # a rotten or planted entry in the node cache, under a real chunk's name
            cached = ChunkStore(store).path(
                open_spore(PRISTINE.parent / "parent.spore", Store(WORK / "src-store"))[
                    0
                ].memory.stored()[0]
            )
            cached.parent.mkdir(parents=True, exist_ok=True)
            if fdp.ConsumeBool():
                cached.symlink_to(PRISTINE / TARGETS[0])
            else:
                cached.write_bytes(_damage(fdp, b"\0" * 64))
        out = case / "out.spore"
        try:
            pull(open_source(parse_pull_uri(f"file://{remote}@{DIGEST}")), store, out)
        except SporeError:
            assert not out.exists(), "a failed pull left its output"
            return
        m, _, rootfs = open_spore(out, store)
        mf.verify_chunks(m, ChunkStore(store), rehash=True)
        assert blake3_file(rootfs)[0] == m.rootfs.digest
    finally:
        shutil.rmtree(case, ignore_errors=True)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
