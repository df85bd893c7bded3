"""spore build, spore rootfs, spore graph."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sporevm.cli.common import emit_json, sporefile_path
from sporevm.errors import UsageError
from sporevm.store import Store


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
    result = build(sporefile_path(args.file or args.path), Store(), options, reporter)
    took = time.monotonic() - started
    if args.json:
        doc = result.to_json()
        doc["seconds"] = round(took, 3)
        doc["warnings"] = reporter.warnings
        emit_json(doc)
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
        emit_json(doc)
    else:
        reporter.info(f"{args.output}: {record.digest} ({record.size} bytes)")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from sporevm.pipeline.driver import describe

    dag = describe(sporefile_path(args.file or args.path), Store())
    if args.json:
        emit_json(dag)
        return 0
    for node in dag["tasks"]:
        deps = ", ".join(node["deps"]) or "-"
        print(f"{node['name']:<24} <- {deps:<24} {node['doc']}")
    return 0
