"""A build step's ``copy_out:`` artifacts, collected into the build context's ``out/``.

Right after the step exits 0 (before its snapshot), each ``src`` is copied out of
the guest exactly as `spore run --copy-out` does it (``copy_extract``: the guest is
hostile, nothing followed, bounded, fsync'd), into a fresh directory beside
``out/<dst>``; only then does it replace the previous build's ``out/<dst>`` (a real
directory, never a symlink or a file: those are refused), so ``out/<dst>`` is always
a whole set of artifacts. Artifacts come from the step that ran: a step served
from the cache has nothing to copy, and ``out/<dst>`` stays what that step last
produced (docs/sporefile.md, ``copy_out``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from sporevm.atomic import fsync_dir
from sporevm.build.copy_extract import Bounds, extract
from sporevm.build.progress import Reporter
from sporevm.errors import CopyError
from sporevm.runtime.agent_session import AgentError, AgentSession, AgentTimeoutError
from sporevm.runtime.copyio import CopyOutStream
from sporevm.sporefile import Artifact, Step

BOUNDS = Bounds()  # the `spore run --copy-out` defaults: 1 GiB, 100 000 entries per artifact


def _replace(staged: Path, dest: Path, what: str) -> None:
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.rename(staged, dest)
        fsync_dir(dest.parent)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise CopyError(f"{what}: {dest} exists and is not a directory; remove it")
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, trash / "old")
    os.rename(staged, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(trash, ignore_errors=True)


def collect_one(session: AgentSession, step: str, art: Artifact, bounds: Bounds = BOUNDS) -> int:
    """Copy one artifact out; the number of entries."""
    what = f"step {step}: copy_out {art.src} → out/{art.dst}"
    art.path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{art.path.name}.new-", dir=art.path.parent))
    stream = CopyOutStream(
        session, art.src, bounds.max_bytes, bounds.max_entries, bounds.stream_limit(), what=what
    )
    try:
        try:
            stats = extract(stream, stage / "tree", bounds, what)
        except (AgentError, AgentTimeoutError) as exc:
            raise CopyError(f"{what}: {exc}") from None
        _replace(stage / "tree", art.path, what)
    except BaseException:
        stream.abandon()
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(stage)
    return stats.entries


def collect(session: AgentSession, step: Step, reporter: Reporter) -> None:
    """Every artifact of ``step``; the first failure fails the build (CopyError)."""
    for art in step.copy_out:
        started = time.monotonic()
        entries = collect_one(session, step.name, art)
        reporter.info(
            f"  step:{step.name} copied {art.src} → out/{art.dst} ({entries} entries, "
            f"{time.monotonic() - started:.2f} s)"
        )
