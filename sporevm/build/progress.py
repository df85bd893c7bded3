"""What a build tells its user while it runs: task lines, progress bars, warnings.

Human output goes to stderr (rich, bars only on a terminal); ``--json``
suppresses it so stdout carries exactly one JSON document.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich (~50 ms to import) is loaded when something is first printed
    from rich.console import Console
    from rich.progress import Progress


class Reporter:
    def __init__(self, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._console = console
        self.statuses: dict[str, str] = {}
        self.warnings: list[str] = []
        self._progress: Progress | None = None
        self._bars: dict[str, Any] = {}
        self._started: dict[str, float] = {}

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._console

    @classmethod
    def quiet(cls) -> Reporter:
        return cls(enabled=False)

    # -- messages --------------------------------------------------------
    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._console is None and "[" not in msg and ":" not in msg:
            # Plain text, as rich would print it: `run --from` says one line and does
            # not pay rich's import for it ("[" is markup, ":" may be an emoji code).
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        else:
            self.console.print(msg)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self.enabled:
            self.console.print(f"[yellow]warning:[/yellow] {msg}")

    def step_output(self, step: str, stream: str, line: str) -> None:
        """One line a step printed, streamed as it runs."""
        if self.enabled:
            style = "red" if stream == "stderr" else "dim"
            self.console.print(f"[{style}]  {step} |[/{style}] ", end="")
            self.console.out(line, highlight=False)

    # -- progress bars ---------------------------------------------------
    def _bar(self, key: str, label: str, total: int) -> Any:
        if not (self.enabled and self.console.is_terminal):
            return None
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        if key not in self._bars:
            self._bars[key] = self._progress.add_task(label, total=total or None)
        return self._bars[key]

    def fetch_progress(self, name: str, done: int, total: int) -> None:
        bar = self._bar("fetch:" + name, f"fetch {name[:19]}", total)
        if bar is not None and self._progress is not None:
            self._progress.update(bar, completed=done)

    def byte_counter(self, label: str, total: int) -> Callable[[int], None]:
        """A callback that advances a bar by n bytes each call."""
        bar = self._bar("count:" + label, label, total)

        def advance(n: int) -> None:
            if bar is not None and self._progress is not None:
                self._progress.advance(bar, n)

        return advance

    def stop_bars(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._bars.clear()

    # -- doit reporter ---------------------------------------------------
    def doit_reporter_class(self) -> type:
        outer = self

        class _DoitReporter:
            def __init__(self, outstream: Any, options: Any) -> None:
                pass

            def initialize(self, tasks: Any, selected_tasks: Any) -> None:
                pass

            def get_status(self, task: Any) -> None:
                pass

            def execute_task(self, task: Any) -> None:
                outer._started[task.name] = time.monotonic()
                outer.info(f"[bold]▶ {task.name}[/bold] {task.doc or ''}")

            def add_success(self, task: Any) -> None:
                outer.stop_bars()
                took = time.monotonic() - outer._started.get(task.name, time.monotonic())
                outer.statuses[task.name] = "executed"
                outer.info(f"[green]✓ {task.name}[/green] ({took:.2f} s)")

            def add_failure(self, task: Any, fail: Any) -> None:
                outer.stop_bars()
                outer.statuses[task.name] = "failed"

            def skip_uptodate(self, task: Any) -> None:
                outer.statuses[task.name] = "up-to-date"
                outer.info(f"[dim]· {task.name} up to date[/dim]")

            def skip_ignore(self, task: Any) -> None:
                outer.statuses[task.name] = "ignored"

            def cleanup_error(self, exception: Any) -> None:
                outer.warn(f"cleanup failed: {exception}")

            def runtime_error(self, msg: str) -> None:
                outer.stop_bars()
                print(msg, file=sys.stderr)

            def teardown_task(self, task: Any) -> None:
                pass

            def complete_run(self) -> None:
                outer.stop_bars()

        return _DoitReporter
