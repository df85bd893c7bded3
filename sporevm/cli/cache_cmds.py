"""spore cache ls | prune | keep | roots | verify."""

from __future__ import annotations

import argparse
import sys
import time

from sporevm.cli.common import duration_or_zero, emit_json
from sporevm.errors import StoreError, UsageError
from sporevm.store import Store


def cmd_cache_ls(args: argparse.Namespace) -> int:
    entries = Store().entries()
    if args.json:
        emit_json(
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


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from sporevm.sporefile import format_duration
    from sporevm.store import StoreBusy

    if args.all and args.older_than:
        raise UsageError("--all and --older-than exclude each other")
    older: float | None = None
    if not args.all:
        older = duration_or_zero(args.older_than or "168h") or None  # 0: all, as --all
    wait = 0.0 if args.no_wait else duration_or_zero(args.wait)
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
        emit_json(
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
    return emit_json(rows) if args.json else 0


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
    return emit_json(rows) if args.json else 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from sporevm.storecheck import verify_store

    store = Store()
    with store.lock():
        report = verify_store(store)
    if args.json:
        emit_json(report.to_json())
    else:
        for prob in report.problems:
            print(f"{prob.kind:<9} {prob.path}: {prob.message}")
        checked = ", ".join(f"{n} {area}" for area, n in sorted(report.checked.items()))
        print(
            f"{store.root}: checked {checked or 'nothing'}; {len(report.fatal())} "
            f"problem(s), {len(report.problems) - len(report.fatal())} dangling/stale record(s)"
        )
    return 1 if report.fatal() else 0
