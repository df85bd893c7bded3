"""The argument parser: every command, its flags and its handler."""

from __future__ import annotations

import argparse
import functools

from sporevm import __version__
from sporevm.cli.build_cmds import cmd_build, cmd_graph, cmd_rootfs
from sporevm.cli.cache_cmds import (
    cmd_cache_keep,
    cmd_cache_ls,
    cmd_cache_prune,
    cmd_cache_roots,
    cmd_cache_verify,
)
from sporevm.cli.common import PRUNE_WAIT_DEFAULT
from sporevm.cli.run_cmds import cmd_fork, cmd_run
from sporevm.cli.server_cmds import add_parser as add_server_parser
from sporevm.cli.spore_cmds import cmd_inspect, cmd_pack, cmd_pull, cmd_push, cmd_unpack, cmd_verify


@functools.cache
def shared_parser() -> argparse.ArgumentParser:
    """One parser per process (parsing does not change it). The resident server builds
    it before it forks handlers: ~7 ms natively, ~0.2 s where host code is emulated."""
    return build_parser()


def build_parser() -> argparse.ArgumentParser:
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
    add_server_parser(sub)
    return p
