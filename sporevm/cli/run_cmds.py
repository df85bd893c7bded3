"""spore run (fresh or --from, with copies and network) and spore fork."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from sporevm.cli.common import emit_json, env_pairs, parse_duration
from sporevm.errors import UsageError
from sporevm.store import Store

if TYPE_CHECKING:
    from sporevm.build.copies import CopyPlan
    from sporevm.runtime.network import NetworkSpec


def cmd_run(args: argparse.Namespace) -> int:
    from sporevm.build.progress import Reporter
    from sporevm.build.runner import RunRequest, run
    from sporevm.units import parse_size

    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    req = RunRequest(
        argv=tuple(argv),
        image=args.image,
        rootfs=Path(args.rootfs) if args.rootfs else None,
        spore=Path(args.spore) if args.spore else None,
        restore=args.restore,
        env=env_pairs(args.env),
        cwd=args.workdir,
        memory=parse_size(args.memory),
        vcpus=args.vcpus,
        timeout=parse_duration(args.timeout) if args.timeout else None,
        boot_timeout=parse_duration(args.boot_timeout),
        kernel=Path(args.kernel) if args.kernel else None,
        platform=args.platform,
        insecure_registries=frozenset(args.insecure_registry),
        copies=run_copies(args),
        network=run_network(args),
        net_log=Path(args.net_log) if args.net_log else None,
    )
    return run(req, Store(), Reporter(enabled=not args.quiet))


def run_copies(args: argparse.Namespace) -> CopyPlan | None:
    """--copy-in/--copy-out and their owner and bounds, checked now (docs/cli.md); None
    when no copy option was given (the copy and tar code is then never imported)."""
    given = (args.copy_in, args.copy_out, args.copy_in_owner, args.copy_out_max_bytes)
    if not any(given) and args.copy_out_max_entries is None:
        return None
    from sporevm.build.copies import make_plan
    from sporevm.units import parse_size

    return make_plan(
        args.copy_in,
        args.copy_out,
        args.copy_in_owner,
        parse_size(args.copy_out_max_bytes) if args.copy_out_max_bytes else None,
        args.copy_out_max_entries,
    )


def run_network(args: argparse.Namespace) -> NetworkSpec | None:
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
        emit_json({"parent": parent_id, "children": children})
    else:
        for c in children:
            print(f"{c['path']}  {c['manifest_id']}  generation {c['generation']}")
    return 0
