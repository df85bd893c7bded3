"""`--copy-in` / `--copy-out` of `spore run` (and `copy_out:` of build steps): the plan,
its checks before a VM starts, and the copies themselves over a ready agent session.

A copy-in streams ``copy_archive.write_archive`` into a ``CopyInStream``; a
copy-out extracts a ``CopyOutStream`` with ``copy_extract.extract``. Every
failure is a CopyError (exit code 74, one line); a failed copy-out does not stop
the others, so a job's remaining reports still come back.
"""

from __future__ import annotations

import os
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sporevm.build.copy_archive import write_archive
from sporevm.build.copy_extract import Bounds, check_target, extract
from sporevm.build.progress import Reporter
from sporevm.errors import CopyError, UsageError
from sporevm.runtime.agent_session import AgentError, AgentSession, AgentTimeoutError
from sporevm.runtime.copyio import CopyInStream, CopyOutStream

MAX_ID = 2**32 - 2


@dataclass(frozen=True)
class CopyIn:
    host: Path  # absolute
    guest: str  # absolute, normalized


@dataclass(frozen=True)
class CopyOut:
    guest: str
    host: Path


@dataclass(frozen=True)
class CopyPlan:
    ins: tuple[CopyIn, ...] = ()
    outs: tuple[CopyOut, ...] = ()
    owner: tuple[int, int] = (0, 0)  # uid, gid of everything copied in
    bounds: Bounds = field(default_factory=Bounds)


def guest_path(text: str, flag: str) -> str:
    if not text.startswith("/") or "\0" in text or len(text.encode()) > 4096:
        raise UsageError(f"{flag}: the guest path {text!r} must be absolute (≤ 4096 bytes)")
    norm = posixpath.normpath(text)
    return "/" + norm.lstrip("/")


def parse_copy_in(spec: str) -> CopyIn:
    """``HOST_PATH:GUEST_PATH``, split at the last ``:`` (host paths may hold one)."""
    host, sep, guest = spec.rpartition(":")
    if not sep or not host or not guest:
        raise UsageError(f"--copy-in {spec!r}: give HOST_PATH:GUEST_PATH, e.g. ./repo:/work")
    return CopyIn(Path(os.path.abspath(host)), guest_path(guest, "--copy-in"))


def parse_copy_out(spec: str) -> CopyOut:
    """``GUEST_PATH:HOST_DIR``, split at the first ``:`` (host paths may hold one)."""
    guest, sep, host = spec.partition(":")
    if not sep or not host or not guest:
        raise UsageError(f"--copy-out {spec!r}: give GUEST_PATH:HOST_DIR, e.g. /work/out:./out")
    return CopyOut(guest_path(guest, "--copy-out"), Path(os.path.abspath(host)))


def parse_owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()) or max(int(uid), int(gid)) > MAX_ID:
        raise UsageError(f"--copy-in-owner {text!r}: give UID:GID as numbers, e.g. 1000:1000")
    return int(uid), int(gid)


def make_plan(
    copy_in: Sequence[str],
    copy_out: Sequence[str],
    owner: str | None = None,
    max_bytes: int | None = None,
    max_entries: int | None = None,
) -> CopyPlan:
    default = Bounds()
    if max_entries is not None and max_entries < 1:
        raise UsageError("--copy-out-max-entries: give a positive count")
    bounds = Bounds(
        default.max_bytes if max_bytes is None else max_bytes,
        default.max_entries if max_entries is None else max_entries,
    )
    return CopyPlan(
        tuple(parse_copy_in(s) for s in copy_in),
        tuple(parse_copy_out(s) for s in copy_out),
        parse_owner(owner) if owner else (0, 0),
        bounds,
    )


def check_plan(plan: CopyPlan) -> None:
    """What can be checked before a VM starts: sources exist, targets are new or empty
    and distinct."""
    for ci in plan.ins:
        if not os.path.lexists(ci.host):
            raise CopyError(f"--copy-in: {ci.host} does not exist")
    seen: set[Path] = set()
    for co in plan.outs:
        if co.host in seen:
            raise UsageError(f"--copy-out: {co.host} is named twice; give each copy its own dir")
        seen.add(co.host)
        check_target(co.host, f"--copy-out {co.guest}")


def copy_in(session: AgentSession, plan: CopyPlan, reporter: Reporter) -> None:
    """Every ``--copy-in``, in order; the first failure stops the run (the command does
    not start on a half-copied tree)."""
    for ci in plan.ins:
        what = f"--copy-in {ci.host} → {ci.guest}"
        started = time.monotonic()
        stream = CopyInStream(session, ci.guest, *plan.owner, what=what)
        try:
            stats = write_archive(ci.host, stream)
            stream.finish()
        except BaseException:
            stream.abandon()
            raise
        reporter.info(
            f"copied in {ci.host} → {ci.guest}: {stats.entries} entries, {stats.bytes} B "
            f"in {time.monotonic() - started:.2f} s"
        )


def copy_out(session: AgentSession, plan: CopyPlan, reporter: Reporter) -> int:
    """Every ``--copy-out``; each failure is printed as one line. The number that failed."""
    failed = 0
    for co in plan.outs:
        what = f"--copy-out {co.guest} → {co.host}"
        started = time.monotonic()
        b = plan.bounds
        stream = CopyOutStream(
            session, co.guest, b.max_bytes, b.max_entries, b.stream_limit(), what=what
        )
        try:
            stats = extract(stream, co.host, b, what)
        except (CopyError, AgentError, AgentTimeoutError) as exc:
            stream.abandon()
            failed += 1
            msg = str(exc) if isinstance(exc, CopyError) else f"{what}: {exc}"
            print(f"spore: error: {msg}", file=sys.stderr, flush=True)
            continue
        reporter.info(
            f"copied out {co.guest} → {co.host}: {stats.entries} entries, {stats.bytes} B "
            f"in {time.monotonic() - started:.2f} s"
        )
    return failed
