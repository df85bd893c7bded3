"""Tasks as plain data, and the typed values they hand to the tasks after them.

A task is a ``TaskSpec``: a name, a doc line, the tasks it runs after, an action and an
up-to-date check. Both ``spore build`` and the repository's dodo.py give these to doit
unchanged (``to_doit``). An action returns nothing; what it makes for a later task it
gives to the build's ``Handoff``, one value per type, and the later task takes it by type.
A task whose input was never made (``doit -s TASK``, or a store changed under the build)
fails with one line, never an assert.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from doit.exceptions import TaskFailed

from sporevm.errors import SporeError

T = TypeVar("T")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    doc: str
    action: Callable[[], None]
    uptodate: Callable[[], bool] | bool
    deps: Sequence[str] = ()

    def to_doit(self, runner: TaskRunner) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "actions": [runner.wrap(self.action)],
            "uptodate": [self.uptodate],
            **({"task_dep": list(self.deps)} if self.deps else {}),
        }


def missing(what: str) -> SporeError:
    return SporeError(
        f"build: {what} is not available: the task that makes it did not run "
        "(run the whole graph; with doit, not -s)"
    )


class Handoff:
    """What tasks have made for later tasks, by type. Values that hold a resource (the
    build VM) are closed by ``close`` if no task took them, e.g. after ``--until boot``."""

    def __init__(self) -> None:
        self._values: dict[type, object] = {}

    def give(self, value: object) -> None:
        self._values[type(value)] = value

    def get(self, kind: type[T]) -> T | None:
        value = self._values.get(kind)
        return value if isinstance(value, kind) else None

    def need(self, kind: type[T], what: str) -> T:
        value = self.get(kind)
        if value is None:
            raise missing(what)
        return value

    def take(self, kind: type[T], what: str) -> T:
        value = self.need(kind, what)
        del self._values[kind]
        return value

    def close(self) -> None:
        for kind in list(self._values):
            value = self._values.pop(kind)
            close = getattr(value, "close", None)
            if callable(close):
                close()


class TaskRunner:
    """Turns an action into doit's: a SporeError becomes a failed task (and the build's
    error, raised once doit returns), and a forked doit worker refuses to run."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.error: SporeError | None = None
        self.bug: Exception | None = None  # not a SporeError: re-raised once doit returns

    def wrap(self, fn: Callable[[], None]) -> Callable[[], TaskFailed | None]:
        def run() -> TaskFailed | None:
            if os.getpid() != self.pid:
                # doit -n N -P process: a forked worker has none of the handed-off values.
                return TaskFailed(
                    "spore's tasks share one build VM and run in one process; "
                    "drop -P process (doit -n N runs them in threads)"
                )
            try:
                fn()
            except SporeError as exc:
                self.error = self.error or exc
                return TaskFailed(str(exc))
            except Exception as exc:
                # doit would print this as a task error and exit 2; the CLI reports bugs
                # as bugs (one line, exit 70, SPORE_TRACEBACK=1 for the traceback).
                self.bug = self.bug or exc
                return TaskFailed(f"{type(exc).__name__}: {exc}")
            return None

        return run
