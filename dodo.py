"""doit's own command line on the very task graph ``spore build`` runs.

    doit list                          the tasks of examples/hello/Sporefile
    doit                               build it, like `spore build examples/hello/Sporefile`
    doit sporefile=path/to/Sporefile   another Sporefile (or its directory)
    doit rootfs | info boot | forget steps | -v 0 | -n 2

The tasks are sporevm.pipeline.driver's, taken as they are (its prepare also makes the
checks `spore build` makes before any work). Each task decides whether it is up to date
by asking the store, so doit and `spore build` agree on what is done; the doit database
(the same file `spore build` uses) only keeps history and never serves a result.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit import get_var
from doit.exceptions import InvalidDodoFile

from sporevm.build.context import BuildOptions
from sporevm.build.progress import Reporter
from sporevm.errors import SporeError
from sporevm.pipeline.driver import doit_config, prepare
from sporevm.store import Store

DEFAULT_SPOREFILE = "examples/hello/Sporefile"  # relative to doit's cwd: this file's dir


def _waiting() -> None:
    print(
        "doit: waiting for the spore store lock (a `spore cache prune` holds it)", file=sys.stderr
    )


# The store is locked shared for the whole doit process, as `spore build` holds it for its
# run: a prune must not remove what a task found up to date before a later task uses it.
_held = contextlib.ExitStack()
atexit.register(_held.close)
try:
    _arg = Path(get_var("sporefile", DEFAULT_SPOREFILE))
    _path = _arg / "Sporefile" if _arg.is_dir() else _arg
    if not _path.is_file():
        raise InvalidDodoFile(
            f"spore: sporefile={_arg}: no Sporefile there; pass doit sporefile=path/to/Sporefile"
        )
    _store = Store()
    _held.enter_context(_store.lock(on_wait=_waiting))
    BUILD = prepare(_path, _store, BuildOptions(), Reporter())
    DOIT_CONFIG: dict[str, Any] = {
        **doit_config(BUILD),
        # -n N: threads, since the tasks hand one build VM along (graph.py refuses processes).
        "par_type": "thread",
    }
except (SporeError, OSError) as exc:
    # doit prints this as one "ERROR: ..." line and exits 3 (no task started), no traceback.
    raise InvalidDodoFile(f"spore: {exc}") from None


@atexit.register
def _close_vm() -> None:
    """A run that stops after boot (`doit boot`) leaves the build VM up: stop it."""
    BUILD.close()


def task_spore() -> Iterator[dict[str, Any]]:
    """The Sporefile's task graph, one doit task per graph task, named as `spore graph` does."""
    for task in BUILD.doit_tasks():
        # basename (not name): top-level tasks named resolve:base, rootfs, ..., not subtasks.
        yield {"basename": task["name"], **{k: v for k, v in task.items() if k != "name"}}
