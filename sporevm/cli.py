"""`spore` command line: parse arguments, call one function per command, print results.

Errors the user can cause are printed as one line (``spore: error: …``) with a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sporevm import __version__
from sporevm.errors import SporeError, StoreError, UsageError
from sporevm.store import Store

if TYPE_CHECKING:
    from sporevm.build.copies import CopyPlan
    from sporevm.runtime.network import NetworkSpec


def parse_duration(text: str) -> float:
    # Imported on use: the Sporefile module pulls in jsonschema (~100 ms), which
    # `spore run --from` and the other non-build commands never need.
    from sporevm.sporefile import parse_duration as parse

    return parse(text)


def _sporefile_path(arg: str | None) -> Path:
    path = Path(arg or "Sporefile")
    if path.is_dir():
        path = path / "Sporefile"
    if not path.is_file():
        raise UsageError(
            f"{path}: no Sporefile here; pass its path (spore build path/to/Sporefile)"
        )
    return path


def _emit_json(doc: Any) -> int:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from sporevm.build.context import BuildOptions
    from sporevm.build.progress import Reporter
    from sporevm.pipeline.driver import build

    if args.file and args.path:
        raise UsageError("give the Sporefile either as PATH or with -f, not both")
    started = time.monotonic()
    reporter = Reporter(enabled=not args.json)
    options = BuildOptions(
        locked=args.locked,
        no_cache=args.no_cache,
        update_lock=args.update_lock,
        insecure_registries=frozenset(args.insecure_registry),
        until=args.until,
        cache_from=tuple(args.cache_from),
        cache_to=tuple(args.cache_to),
        cache_mode=args.cache_mode,
        s3_endpoint=args.s3_endpoint,
    )
    result = build(_sporefile_path(args.file or args.path), Store(), options, reporter)
    took = time.monotonic() - started
    if args.json:
        doc = result.to_json()
        doc["seconds"] = round(took, 3)
        doc["warnings"] = reporter.warnings
        _emit_json(doc)
        return 0
    if result.rootfs is not None:
        reporter.info(
            f"rootfs  {result.rootfs.digest}  {result.rootfs.size >> 20} MiB  {result.rootfs.path}"
        )
    if result.image:
        reporter.info(f"image   {result.image} (manifest {result.manifest})")
    if result.spore:
        reporter.info(f"spore   {result.spore}  {result.manifest_id}")
    if result.bundle:
        reporter.info(f"bundle  {result.bundle}  {result.bundle_digest}")
    for ref in result.pushed:
        print(ref)  # stdout: the pinned reference to pull, one per push: URI
    if args.until and args.until not in ("bundle", "push"):
        reporter.info(f"stopped after {args.until} as asked (--until). ({took:.2f} s)")
    else:
        reporter.info(f"done ({took:.2f} s)")
    return 0


def cmd_rootfs(args: argparse.Namespace) -> int:
    from sporevm.atomic import check_file_output
    from sporevm.build.imagefs import build_rootfs
    from sporevm.build.progress import Reporter

    check_file_output(Path(args.output))  # before any work, not after it
    reporter = Reporter(enabled=not args.json)
    record = build_rootfs(
        args.ref,
        Path(args.output),
        Store(),
        reporter,
        platform=args.platform,
        insecure_registries=frozenset(args.insecure_registry),
    )
    if args.json:
        doc = record.to_json()
        doc["output"] = args.output
        _emit_json(doc)
    else:
        reporter.info(f"{args.output}: {record.digest} ({record.size} bytes)")
    return 0


def _env_pairs(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise UsageError(
                f"-e {item!r}: expected NAME=VALUE with NAME like [A-Za-z_][A-Za-z0-9_]*"
            )
        env[name] = value
    return env


def cmd_run(args: argparse.Namespace) -> int:
    from sporevm.build.progress import Reporter
    from sporevm.build.runner import RunRequest, run
    from sporevm.sporefile import parse_size

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    req = RunRequest(
        argv=tuple(argv),
        image=args.image,
        rootfs=Path(args.rootfs) if args.rootfs else None,
        spore=Path(args.spore) if args.spore else None,
        restore=args.restore,
        env=_env_pairs(args.env),
        cwd=args.workdir,
        memory=parse_size(args.memory),
        vcpus=args.vcpus,
        timeout=parse_duration(args.timeout) if args.timeout else None,
        boot_timeout=parse_duration(args.boot_timeout),
        kernel=Path(args.kernel) if args.kernel else None,
        platform=args.platform,
        insecure_registries=frozenset(args.insecure_registry),
        copies=_run_copies(args),
        network=_run_network(args),
        net_log=Path(args.net_log) if args.net_log else None,
    )
    return run(req, Store(), Reporter(enabled=not args.quiet))


def _run_copies(args: argparse.Namespace) -> CopyPlan:
    """--copy-in/--copy-out and their owner and bounds, checked now (docs/cli.md)."""
    from sporevm.build.copies import make_plan
    from sporevm.sporefile import parse_size

    return make_plan(
        args.copy_in,
        args.copy_out,
        args.copy_in_owner,
        parse_size(args.copy_out_max_bytes) if args.copy_out_max_bytes else None,
        args.copy_out_max_entries,
    )


def _run_network(args: argparse.Namespace) -> NetworkSpec | None:
    """--net-allow/--net-deny-all as a NetworkSpec (checked now), or None (no NIC for a
    fresh VM; the spore's recorded policy for --from)."""
    if args.net_deny_all and args.net_allow:
        raise UsageError("spore run: --net-deny-all and --net-allow exclude each other")
    if not (args.net_allow or args.net_deny_all):
        return None
    from sporevm.runtime.network import NetworkSpec

    return NetworkSpec.parse(args.net_allow, Path(args.net_log) if args.net_log else None)


def cmd_fork(args: argparse.Namespace) -> int:
    from sporevm.spore import manifest
    from sporevm.spore.fork import fork_manifests
    from sporevm.spore.sporedir import open_spore, split_pin, write_spore

    store = Store()
    spore_path, pin = split_pin(args.spore)
    out = Path(args.out)
    children = []
    with store.lock():  # shared: a prune sees each child with its root record, or neither
        m, _, _ = open_spore(spore_path, store, pin)
        parent_id = manifest.id_of(m)
        for i, child in enumerate(fork_manifests(m, parent_id, args.count)):
            path = out / f"child-{i:04d}.spore"
            children.append(
                {
                    "path": str(path),
                    "manifest_id": write_spore(child, path, store),
                    "generation": child.generation.id,
                    "index": i,
                }
            )
    if args.json:
        _emit_json({"parent": parent_id, "children": children})
    else:
        for c in children:
            print(f"{c['path']}  {c['manifest_id']}  generation {c['generation']}")
    return 0


def _inspect_bundle(args: argparse.Namespace, verify: bool) -> int:
    from sporevm.dist import inspect

    root, meta = inspect.load(args.spore)
    doc = inspect.describe(root, meta)
    if verify:
        started = time.monotonic()
        doc["bytes_verified"] = inspect.verify(root, meta)
        doc["seconds"], doc["ok"] = round(time.monotonic() - started, 3), True
    if args.json:
        _emit_json(doc)
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
        return _inspect_bundle(args, verify=False)
    spore_path, pin = split_pin(args.spore)
    m, mpath, rootfs = open_spore(spore_path, Store(), pin)
    doc = manifest.to_document(m)
    mid = manifest.id_of(m)
    if args.json:
        _emit_json({"id": mid, "path": str(mpath), "rootfs_path": str(rootfs), "manifest": doc})
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
    from sporevm.spore.chunks import ChunkStore
    from sporevm.spore.sporedir import open_spore, split_pin
    from sporevm.store import blake3_file

    if is_bundle(args.spore):
        return _inspect_bundle(args, verify=True)
    store = Store()
    spore_path, pin = split_pin(args.spore)
    started = time.monotonic()
    with store.lock():  # a prune waits until every chunk has been re-hashed
        m, mpath, rootfs = open_spore(spore_path, store, pin)
        manifest.verify_chunks(m, ChunkStore(store), rehash=True)
        digest, size = blake3_file(rootfs)
    if (digest, size) != (m.rootfs.digest, m.rootfs.size):
        raise SporeError(
            f"{rootfs}: rootfs is {digest} ({size} B); the spore needs "
            f"{m.rootfs.digest} ({m.rootfs.size} B)"
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
        _emit_json(doc)
    else:
        print(
            f"{mpath.parent}: OK — {doc['chunks']} chunks, {doc['state_objects']} state "
            f"object(s) and the rootfs re-hashed and match ({took:.2f} s)"
        )
    return 0


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
        _emit_json(doc)
    else:
        print(
            f"{res.path}  {res.digest}  ({res.objects} objects in {res.packs} pack(s), "
            f"{res.bytes} B; parent {res.parent}, {len(res.children)} child(ren))"
        )
    return 0


def _pull_doc(res: Any) -> dict[str, Any]:
    return {
        "spore": str(res.out),
        "digest": res.digest,
        "manifest_id": res.manifest_id,
        "objects": res.objects,
        "cached": res.cached,
        "packs_fetched": res.packs_fetched,
        "bytes_received": res.bytes_received,
    }


def _print_pull(res: Any) -> None:
    print(
        f"{res.out}  {res.manifest_id}  (bundle {res.digest}; {res.objects} objects, "
        f"{res.cached} cached, {res.packs_fetched} pack(s) fetched, "
        f"{res.bytes_received} B received)"
    )


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_unpack(args: argparse.Namespace) -> int:
    from sporevm.dist.pack import unpack

    res = unpack(
        args.bundle,
        Path(args.out),
        Store(),
        child=args.child,
        progress=None if args.json else _progress,
    )
    if args.json:
        _emit_json(_pull_doc(res))
    else:
        _print_pull(res)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from sporevm.dist.push import push
    from sporevm.dist.transports import open_sink
    from sporevm.dist.uri import parse_push_uri

    sink = open_sink(parse_push_uri(args.uri), s3_endpoint=args.s3_endpoint)
    res = push(Path(args.bundle), sink)
    if args.json:
        _emit_json(
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
        source, Store(), Path(args.out), child=args.child, progress=None if args.json else _progress
    )
    if args.json:
        _emit_json({**_pull_doc(res), "reference": source.reference})
    else:
        if source.reference != args.uri:  # a tag (--allow-mutable): what it resolved to
            _progress(f"resolved {args.uri} to {source.reference}")
        _print_pull(res)
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from sporevm.pipeline.driver import describe

    dag = describe(_sporefile_path(args.file or args.path), Store())
    if args.json:
        _emit_json(dag)
        return 0
    for node in dag["tasks"]:
        deps = ", ".join(node["deps"]) or "-"
        print(f"{node['name']:<24} <- {deps:<24} {node['doc']}")
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    entries = Store().entries()
    if args.json:
        _emit_json(
            [
                {"kind": e.kind, "name": e.name, "size": e.size, "last_used": e.last_used}
                for e in entries
            ]
        )
        return 0
    total = 0
    for e in entries:
        total += e.size
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.kind:<12} {e.name[:71]:<71} {e.size:>12} {used}")
    print(f"{len(entries)} entries, {total} bytes in {Store().root}")
    return 0


_ZERO_DURATION = re.compile(r"0+|(?=.)(?:0+h)?(?:0+m)?(?:0+s)?(?:0+ms)?")
PRUNE_WAIT_DEFAULT = "5m"


def _duration_or_zero(text: str) -> float:
    """parse_duration, but ``0``, ``0s`` (any zero spelling) is 0 rather than an error."""
    return 0.0 if _ZERO_DURATION.fullmatch(text) else parse_duration(text)


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from sporevm.sporefile import format_duration
    from sporevm.store import StoreBusy

    if args.all and args.older_than:
        raise UsageError("--all and --older-than exclude each other")
    older: float | None = None
    if not args.all:
        older = _duration_or_zero(args.older_than or "168h") or None  # 0: all, as --all
    wait = 0.0 if args.no_wait else _duration_or_zero(args.wait)
    bound = format_duration(wait)
    store = Store()

    def say_waiting() -> None:
        if wait == 0:
            return
        n = store.lock_holders()
        who = (
            f"{n} running spore command{'s' if n != 1 else ''}"
            if n
            else ("running spore commands (builds, runs, pulls)")
        )
        print(
            f"spore: cache prune: waiting up to {bound} for {who} to release the store "
            f"lock ({store.root / 'lock'})",
            file=sys.stderr,
        )

    try:
        res = store.collect(older, on_wait=say_waiting, wait=wait)
    except StoreBusy:
        when = f"still in use after {bound}" if wait else "in use"
        raise StoreError(
            f"cache prune: the store {store.root} is {when} (running builds or VMs hold "
            "it); nothing was removed; retry later or pass --wait LONGER"
        ) from None
    freed = sum(e.size for e in res.removed)
    if args.json:
        _emit_json(
            {
                "removed": len(res.removed),
                "bytes": freed,
                "kept": res.kept,
                "live_spores": res.live_spores,
            }
        )
    else:
        print(
            f"removed {len(res.removed)} entries, {freed} bytes; kept {res.kept} "
            f"(reached from {res.live_spores} live spore(s) or recently used)"
        )
    return 0


def cmd_cache_keep(args: argparse.Namespace) -> int:
    from sporevm.spore.sporedir import keep_spore

    store = Store()
    with store.lock():  # shared: prune sees the record once it may remove anything
        kept = [keep_spore(text, store) for text in args.spores]
    rows = [{"path": r.path, "manifest_id": r.manifest, "missing": n} for r, n in kept]
    for row in rows if not args.json else ():
        print(
            f"{row['path']}  {row['manifest_id']}  kept"
            + (
                f"; {row['missing']} object(s) it names are not in the store: pull or rebuild it"
                if row["missing"]
                else ""
            )
        )
    return _emit_json(rows) if args.json else 0


def cmd_cache_roots(args: argparse.Namespace) -> int:
    from sporevm.storeroots import survey_store

    store = Store()
    with store.lock():
        rows = [
            {
                "record": s.name,
                "path": s.root.path if s.root else None,
                "manifest_id": s.root.manifest if s.root else None,
                "state": p.state if p else "invalid",
                "detail": p.detail if p else s.error,
            }
            for s, p in survey_store(store.root)
        ]
    rows.sort(key=lambda r: (r["path"] or "", r["record"]))
    for r in rows if not args.json else ():
        print(
            f"{r['state']:<10} {r['path'] or 'roots/' + str(r['record'])}  "
            f"{r['manifest_id'] or '-'}" + (f"  ({r['detail']})" if r["detail"] else "")
        )
    return _emit_json(rows) if args.json else 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from sporevm.storecheck import verify_store

    store = Store()
    with store.lock():
        report = verify_store(store)
    if args.json:
        _emit_json(report.to_json())
    else:
        for prob in report.problems:
            print(f"{prob.kind:<9} {prob.path}: {prob.message}")
        checked = ", ".join(f"{n} {area}" for area, n in sorted(report.checked.items()))
        print(
            f"{store.root}: checked {checked or 'nothing'}; {len(report.fatal())} "
            f"problem(s), {len(report.problems) - len(report.fatal())} dangling/stale record(s)"
        )
    return 1 if report.fatal() else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spore",
        description="Build and run spores: sealed, "
        "content-addressed checkpoints of warm Linux microVMs.",
    )
    p.add_argument("--version", action="version", version=f"spore {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_json(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    def add_insecure(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--insecure-registry",
            metavar="HOST",
            action="append",
            default=[],
            help="allow plain HTTP to HOST[:PORT] (loopback registries always may)",
        )

    def add_no_jail(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--no-jail",
            action="store_true",
            help="debug only: run VM monitors without their seccomp/Landlock jail "
            "(also SPORE_NO_JAIL=1; docs/jail.md)",
        )

    b = sub.add_parser("build", help="build a Sporefile (resolve, fetch, rootfs, …)")
    b.add_argument("path", nargs="?", help="Sporefile or its directory (default ./Sporefile)")
    b.add_argument("-f", "--file", help="the Sporefile")
    b.add_argument("--locked", action="store_true", help="fail instead of changing Sporefile.lock")
    b.add_argument(
        "--update-lock", action="store_true", help="re-resolve tags even if the lock records them"
    )
    b.add_argument(
        "--until", metavar="TASK", help="stop after TASK (e.g. rootfs); see `spore graph`"
    )
    b.add_argument(
        "--no-cache", action="store_true", help="re-verify cached blobs and rebuild every task"
    )
    b.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="URI",
        help="restore the managed kernel and step snapshots from this remote cache "
        "(repeatable; file://, oci://, s3://, https://; docs/cache.md)",
    )
    b.add_argument(
        "--cache-to",
        action="append",
        default=[],
        metavar="URI",
        help="store this build's kernel and step snapshots in this cache (repeatable)",
    )
    b.add_argument(
        "--cache-mode",
        choices=("min", "max"),
        help="what --cache-to stores: max, every step's snapshot (default); min, the spore's only",
    )
    b.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for s3:// caches")
    add_insecure(b)
    add_json(b)
    add_no_jail(b)
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("rootfs", help="build the ext4 rootfs of an image, nothing else")
    r.add_argument("ref", help="image reference (registry ref or oci-layout:PATH[:TAG|@DIGEST])")
    r.add_argument("-o", "--output", required=True, help="where to write the ext4 file")
    r.add_argument("--platform", default="linux/amd64")
    add_insecure(r)
    add_json(r)
    r.set_defaults(func=cmd_rootfs)

    rn = sub.add_parser("run", help="boot a fresh VM, run one command, exit with its code")
    src = rn.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", metavar="REF", help="image to build the rootfs from")
    src.add_argument("--rootfs", metavar="FILE", help="an ext4 rootfs file (read-only)")
    src.add_argument("--from", dest="spore", metavar="SPORE", help="resume this spore")
    rn.add_argument(
        "--restore",
        choices=("eager", "lazy", "local"),
        default="eager",
        help="with --from: copy RAM up front, fault it in on demand, or map a shared "
        "local memory file (docs/restore.md)",
    )
    rn.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    rn.add_argument("-w", "--workdir", default="/", help="working directory in the guest")
    rn.add_argument("--memory", default="256MiB")
    rn.add_argument("--vcpus", type=int, default=1)
    rn.add_argument("--timeout", metavar="DURATION", help="kill the command after this long")
    rn.add_argument("--boot-timeout", metavar="DURATION", default="5m")
    rn.add_argument(
        "--copy-in",
        action="append",
        default=[],
        metavar="HOST_PATH:GUEST_PATH",
        help="before the command, copy a host file or directory to GUEST_PATH (repeatable)",
    )
    rn.add_argument(
        "--copy-in-owner",
        metavar="UID:GID",
        help="owner of everything copied in (default 0:0)",
    )
    rn.add_argument(
        "--copy-out",
        action="append",
        default=[],
        metavar="GUEST_PATH:HOST_DIR",
        help="after the command (also a failing one), copy GUEST_PATH into HOST_DIR, "
        "which must be new or empty (repeatable)",
    )
    rn.add_argument(
        "--copy-out-max-bytes",
        metavar="SIZE",
        help="file content one copy-out may bring back (default 1GiB)",
    )
    rn.add_argument(
        "--copy-out-max-entries",
        type=int,
        metavar="N",
        help="entries one copy-out may bring back (default 100000)",
    )
    rn.add_argument(
        "--kernel", metavar="PATH", help="boot this bzImage/vmlinux, not the managed one"
    )
    rn.add_argument("--platform", default="linux/amd64")
    rn.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    rn.add_argument(
        "--net-allow",
        action="append",
        default=[],
        metavar="ENTRY",
        help="give the guest a NIC whose gateway allows ENTRY (repeatable): a host name, "
        "host:port, IPv4 address or CIDR, addr:port, or public; with --from it replaces "
        "the spore's recorded policy (docs/network.md)",
    )
    rn.add_argument(
        "--net-deny-all",
        action="store_true",
        help="with --from: keep the spore's NIC but allow nothing",
    )
    rn.add_argument("--net-log", metavar="FILE", help="append the gateway's decisions (JSON lines)")
    add_insecure(rn)
    add_no_jail(rn)
    rn.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    rn.set_defaults(func=cmd_run)

    fk = sub.add_parser("fork", help="children of a spore with distinct generation identity")
    fk.add_argument("spore", metavar="SPORE")
    fk.add_argument("--count", type=int, required=True)
    fk.add_argument("--out", required=True, metavar="DIR")
    add_json(fk)
    fk.set_defaults(func=cmd_fork)

    ins = sub.add_parser("inspect", help="show a spore's manifest or a bundle's contents")
    ins.add_argument("spore", metavar="SPORE")
    add_json(ins)
    ins.set_defaults(func=cmd_inspect)
    ver = sub.add_parser(
        "verify", help="re-hash every chunk, state object and the rootfs (of a spore or a bundle)"
    )
    ver.add_argument("spore", metavar="SPORE")
    add_json(ver)
    ver.set_defaults(func=cmd_verify)

    pk = sub.add_parser("pack", help="write a bundle: a spore, its children, chunks, rootfs")
    pk.add_argument("spore", metavar="SPORE", help="the parent spore (DIR or DIR@blake3:<id>)")
    pk.add_argument(
        "--children",
        metavar="DIR",
        help="a directory of child spores (e.g. from `spore fork --out DIR`)",
    )
    pk.add_argument("--out", required=True, metavar="BUNDLE")
    add_json(pk)
    pk.set_defaults(func=cmd_pack)
    up = sub.add_parser("unpack", help="materialize one spore of a local bundle")
    up.add_argument("bundle", metavar="BUNDLE", help="DIR or DIR@sha256:<bundle digest>")
    up.add_argument("--child", metavar="ID", help="a child's manifest id (default: the parent)")
    up.add_argument("--out", required=True, metavar="SPORE")
    add_json(up)
    up.set_defaults(func=cmd_unpack)
    ps = sub.add_parser("push", help="upload a bundle; prints the pinned reference to pull")
    ps.add_argument("bundle", metavar="BUNDLE")
    ps.add_argument(
        "uri", metavar="URI", help="file:///abs/dir, oci://host/repo[:tag], s3://bucket/prefix"
    )
    ps.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for s3://")
    add_json(ps)
    ps.set_defaults(func=cmd_push)
    pl = sub.add_parser("pull", help="fetch one spore of a digest-pinned bundle")
    pl.add_argument("uri", metavar="URI", help="…@sha256:<digest> as printed by `spore push`")
    pl.add_argument("--child", metavar="ID", help="a child's manifest id (default: the parent)")
    pl.add_argument("--out", required=True, metavar="SPORE")
    pl.add_argument(
        "--allow-mutable",
        action="store_true",
        help="allow an unpinned oci://…:tag (resolved and printed)",
    )
    pl.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint for s3://")
    add_json(pl)
    pl.set_defaults(func=cmd_pull)

    g = sub.add_parser("graph", help="print the task graph of a Sporefile")
    g.add_argument("path", nargs="?")
    g.add_argument("-f", "--file")
    add_json(g)
    g.set_defaults(func=cmd_graph)

    c = sub.add_parser("cache", help="inspect and prune the local store ($SPORE_HOME)")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = csub.add_parser("ls", help="list store entries")
    add_json(ls)
    ls.set_defaults(func=cmd_cache_ls)
    pr = csub.add_parser("prune", help="remove staging leftovers and entries no live spore needs")
    pr.add_argument(
        "--older-than",
        metavar="DURATION",
        help="remove unreachable entries unused for this long (default 168h; 0: all of them)",
    )
    pr.add_argument(
        "--all", action="store_true", help="remove every unreachable entry (same as --older-than 0)"
    )
    wt = pr.add_mutually_exclusive_group()
    wt.add_argument(
        "--wait",
        metavar="DURATION",
        default=PRUNE_WAIT_DEFAULT,
        help="how long to wait for running builds and VMs to release the store, then "
        f"fail with nothing removed (default {PRUNE_WAIT_DEFAULT}; 0: fail at once if busy)",
    )
    wt.add_argument("--no-wait", action="store_true", help="same as --wait 0")
    add_json(pr)
    pr.set_defaults(func=cmd_cache_prune)
    kp = csub.add_parser(
        "keep",
        help="record spore directories (e.g. moved or copied by "
        "hand) as roots: prune keeps what they need",
    )
    kp.add_argument("spores", nargs="+", metavar="SPORE", help="DIR or DIR@blake3:<id>")
    add_json(kp)
    kp.set_defaults(func=cmd_cache_keep)
    rt = csub.add_parser("roots", help="list the spore directories prune keeps alive")
    add_json(rt)
    rt.set_defaults(func=cmd_cache_roots)
    cv = csub.add_parser(
        "verify", help="re-hash every entry and check every record (docs/publish-protocol.md)"
    )
    add_json(cv)
    cv.set_defaults(func=cmd_cache_verify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "no_jail", False):
        os.environ["SPORE_NO_JAIL"] = "1"  # every monitor this process starts inherits it
    if os.environ.get("SPORE_NO_JAIL", "") not in ("", "0"):
        from sporevm.runtime.confine import warn_unjailed

        warn_unjailed("every VM monitor this command starts")
    try:
        code: int = args.func(args)
        return code
    except SporeError as exc:
        print(f"spore: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spore: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the host failed us (disk, permissions): one line, no traceback
        if os.environ.get("SPORE_TRACEBACK"):
            raise
        print(f"spore: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line; the traceback only on request
        if os.environ.get("SPORE_TRACEBACK"):
            raise
        print(
            f"spore: internal error: {type(exc).__name__}: {_one_line(str(exc))}; this is a "
            "bug — run again with SPORE_TRACEBACK=1 and report what it prints",
            file=sys.stderr,
        )
        return 70


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the file, what the system said, and what to do."""
    what = exc.strerror or type(exc).__name__
    where = " -> ".join(os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None)
    head = f"{where}: {what}" if where else _one_line(str(exc)) or what
    return f"{head}; check the disk, its free space and permissions, then run again"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


if __name__ == "__main__":
    sys.exit(main())
