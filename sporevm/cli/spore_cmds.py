"""Commands that read or move spores and bundles: inspect, verify, pack, unpack, push, pull.

They load no VMM module (tests/test_layering.py checks it end to end)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sporevm.cli.common import emit_json, print_pull, progress, pull_doc
from sporevm.errors import SporeError
from sporevm.store import Store

if TYPE_CHECKING:
    from sporevm.spore import manifest
    from sporevm.spore.blocktable import Hashed


def inspect_bundle(args: argparse.Namespace, verify: bool) -> int:
    from sporevm.dist import inspect

    root, meta = inspect.load(args.spore)
    doc = inspect.describe(root, meta)
    if verify:
        started = time.monotonic()
        doc["bytes_verified"] = inspect.verify(root, meta)
        doc["seconds"], doc["ok"] = round(time.monotonic() - started, 3), True
    if args.json:
        emit_json(doc)
        return 0
    print(f"bundle      {root}  {meta.digest}")
    print(f"parent      {meta.doc.parent}")
    for child in meta.doc.children:
        print(f"child       {child}")
    print(
        f"objects     {doc['objects']} in {len(doc['packs'])} pack(s), "
        f"{sum(p['size'] for p in doc['packs'])} B"
    )
    for img in doc["rootfs"]:
        print(f"rootfs      {img['digest']} ({img['size']} B, {img['segments']} segment(s))")
    if verify:
        print(
            f"{root}: OK — {doc['bytes_verified']} B of packs, objects and rootfs re-hashed "
            f"({doc['seconds']:.2f} s)"
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sporevm.dist.inspect import is_bundle
    from sporevm.spore import manifest
    from sporevm.spore.sporedir import open_spore, split_pin

    if is_bundle(args.spore):
        return inspect_bundle(args, verify=False)
    spore_path, pin = split_pin(args.spore)
    m, mpath, rootfs = open_spore(spore_path, Store(), pin)
    doc = manifest.to_document(m)
    mid = manifest.id_of(m)
    if args.json:
        emit_json({"id": mid, "path": str(mpath), "rootfs_path": str(rootfs), "manifest": doc})
        return 0
    stored = m.memory.stored()
    zero = sum(1 for c in m.memory.chunks if c is None)
    p, g = m.platform, m.generation
    print(f"spore       {mpath.parent}  {mid}")
    print(
        f"platform    {p.arch} {p.cpu_profile} {p.device_model}, {p.memory >> 20} MiB, "
        f"{p.vcpus} vCPU"
    )
    print(f"kernel      {p.kernel}\ninitrd      {p.initrd}\ncmdline     {p.cmdline}")
    net = "none (no NIC)" if m.network is None else "allow " + (", ".join(m.network) or "nothing")
    print(f"network     {net}")
    print(
        f"rootfs      {m.rootfs.digest} ({m.rootfs.size} B, {m.rootfs.kind}) "
        f"from {m.rootfs.source_image}"
    )
    t = m.rootfs.table
    print(
        f"rootfs tbl  {t.digest} ({t.block_size >> 10} KiB blocks, each checked on first read)"
        if t is not None
        else "rootfs tbl  none (sealed before block tables: the image is hashed whole on restore)"
    )
    print(
        f"memory      {len(m.memory.chunks)} chunks of {m.memory.chunk_size >> 20} MiB: "
        f"{len(stored)} stored, {zero} zero"
    )
    for name, obj in sorted(m.state.items()):
        print(f"state       {name}: {obj.digest} ({obj.size} B)")
    print(f"generation  {g.id} (index {g.index} of {g.count}, parent {g.parent or '-'})")
    print(
        f"provenance  sporefile {m.provenance.sporefile or '-'}, "
        f"{len(m.provenance.steps)} step(s), {m.provenance.builder}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from sporevm.dist.inspect import is_bundle
    from sporevm.spore import manifest
    from sporevm.spore.blocktable import table_id
    from sporevm.spore.chunks import ChunkStore
    from sporevm.spore.sporedir import open_spore, split_pin

    if is_bundle(args.spore):
        return inspect_bundle(args, verify=True)
    store = Store()
    spore_path, pin = split_pin(args.spore)
    started = time.monotonic()
    with store.lock():  # a prune waits until every chunk has been re-hashed
        m, mpath, rootfs = open_spore(spore_path, store, pin)
        manifest.verify_chunks(m, ChunkStore(store), rehash=True)  # the block table too
        hashed = _hash_rootfs(rootfs, m)
    if (hashed.digest, hashed.size) != (m.rootfs.digest, m.rootfs.size):
        raise SporeError(
            f"{rootfs}: rootfs is {hashed.digest} ({hashed.size} B); the spore needs "
            f"{m.rootfs.digest} ({m.rootfs.size} B)"
        )
    # A full check: the table a restore checks blocks against must describe this image.
    if m.rootfs.table is not None and table_id(hashed.table) != m.rootfs.table.digest:
        raise SporeError(
            f"{mpath}: rootfs.table {m.rootfs.table.digest} does not describe the rootfs "
            f"{m.rootfs.digest} (its blocks hash to table {table_id(hashed.table)})"
        )
    took = time.monotonic() - started
    doc = {
        "spore": str(mpath.parent),
        "id": manifest.id_of(m),
        "chunks": len(m.memory.stored()),
        "state_objects": len(m.state),
        "rootfs": m.rootfs.digest,
        "seconds": round(took, 3),
        "ok": True,
    }
    if args.json:
        emit_json(doc)
    else:
        print(
            f"{mpath.parent}: OK — {doc['chunks']} chunks, {doc['state_objects']} state "
            f"object(s) and the rootfs re-hashed and match ({took:.2f} s)"
        )
    return 0


def _hash_rootfs(path: Path, m: manifest.Manifest) -> Hashed:
    """One read of the image: its digest and its block table (in the spore's block size)."""
    from sporevm.spore.blocktable import hash_image

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return hash_image(fd, m.rootfs.table.block_size if m.rootfs.table else None)
    finally:
        os.close(fd)


def cmd_pack(args: argparse.Namespace) -> int:
    from sporevm.dist.pack import pack

    res = pack(args.spore, Path(args.children) if args.children else None, Path(args.out), Store())
    doc = {
        "bundle": str(res.path),
        "digest": res.digest,
        "parent": res.parent,
        "children": list(res.children),
        "packs": res.packs,
        "objects": res.objects,
        "bytes": res.bytes,
    }
    if args.json:
        emit_json(doc)
    else:
        print(
            f"{res.path}  {res.digest}  ({res.objects} objects in {res.packs} pack(s), "
            f"{res.bytes} B; parent {res.parent}, {len(res.children)} child(ren))"
        )
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from sporevm.dist.pack import unpack

    res = unpack(
        args.bundle,
        Path(args.out),
        Store(),
        child=args.child,
        progress=None if args.json else progress,
    )
    if args.json:
        emit_json(pull_doc(res))
    else:
        print_pull(res)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from sporevm.dist.push import push
    from sporevm.dist.transports import open_sink
    from sporevm.dist.uri import parse_push_uri

    sink = open_sink(parse_push_uri(args.uri), s3_endpoint=args.s3_endpoint)
    res = push(Path(args.bundle), sink)
    if args.json:
        emit_json(
            {
                "digest": res.digest,
                "reference": res.reference,
                "files": res.files,
                "bytes": res.bytes,
            }
        )
    else:
        print(res.reference)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from sporevm.dist.pull import pull
    from sporevm.dist.transports import open_source
    from sporevm.dist.uri import parse_pull_uri

    source = open_source(
        parse_pull_uri(args.uri, allow_mutable=args.allow_mutable), s3_endpoint=args.s3_endpoint
    )
    res = pull(
        source, Store(), Path(args.out), child=args.child, progress=None if args.json else progress
    )
    if args.json:
        emit_json({**pull_doc(res), "reference": source.reference})
    else:
        if source.reference != args.uri:  # a tag (--allow-mutable): what it resolved to
            progress(f"resolved {args.uri} to {source.reference}")
        print_pull(res)
    return 0
