"""Running a Sporefile's steps and verify checks in a booted VM through the agent.

(The keys their snapshots are cached under: cachekeys.py.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sporevm.build.artifacts import collect
from sporevm.build.progress import Reporter
from sporevm.errors import SporeError
from sporevm.runtime.agent import ProbeKind
from sporevm.runtime.agent_messages import Command as AgentCommand
from sporevm.runtime.agent_messages import Probe
from sporevm.runtime.agent_session import AgentSession, ExecHandle
from sporevm.sporefile import (
    Check,
    ReadyProbe,
    Step,
)

TAIL_LINES = 20


class StepError(SporeError):
    """A build step failed; nothing of this build was published."""


class _OutputTail:
    """The last lines of a step's output, for the failure message; also echoes live."""

    def __init__(self, reporter: Reporter, step: str, stream: str) -> None:
        self.reporter, self.step, self.stream = reporter, step, stream
        self.lines: list[str] = []
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        data = self._partial + data
        *full, self._partial = data.split(b"\n")
        for raw in full:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace")
        self.lines = (self.lines + [line])[-TAIL_LINES:]
        self.reporter.step_output(self.step, self.stream, line)

    def flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""


def _probe_message(ready: ReadyProbe) -> Probe:
    timeout_ms = max(1, round(ready.timeout * 1000))
    if ready.kind == "file":
        assert ready.file is not None
        return Probe(ProbeKind.FILE, timeout_ms, path=ready.file)
    if ready.kind == "tcp":
        assert ready.tcp is not None
        return Probe(ProbeKind.TCP, timeout_ms, port=ready.tcp)
    assert ready.command is not None
    cmd = ready.command
    argv, shell = ((cmd,), True) if isinstance(cmd, str) else (tuple(cmd), False)
    return Probe(ProbeKind.COMMAND, timeout_ms, command=AgentCommand(argv, shell, (), "/"))


@dataclass
class StepResult:
    name: str
    seconds: float
    exit_code: int | None  # None for background steps


def run_steps(session: AgentSession, steps: Sequence[Step], reporter: Reporter) -> list[StepResult]:
    results: list[StepResult] = []
    background: list[ExecHandle] = []
    for step in steps:
        started = time.monotonic()
        reporter.info(f"[bold]▶ step:{step.name}[/bold]")
        out = _OutputTail(reporter, step.name, "stdout")
        err = _OutputTail(reporter, step.name, "stderr")
        handle = session.exec(
            step.run,
            env=dict(step.env),
            cwd=step.workdir,
            timeout=step.timeout,
            background=step.background,
            on_stdout=out,
            on_stderr=err,
        )
        if step.background:
            handle.wait_started()
            background.append(handle)
            if step.ready is not None:
                result = session.probe(_probe_message(step.ready))
                if not result.ok:
                    raise StepError(
                        f"step {step.name}: not ready after {step.ready.timeout:g} s "
                        f"({step.ready.kind} probe failed)"
                    )
            results.append(StepResult(step.name, time.monotonic() - started, None))
            continue
        status = handle.wait()
        out.flush()
        err.flush()
        took = time.monotonic() - started
        if status.returncode != 0:
            tail = (err.lines or out.lines)[-TAIL_LINES:]
            shown = "".join(f"\n  | {line}" for line in tail)
            raise StepError(
                f"step {step.name} failed: {status.describe()} after {took:.1f} s; "
                f"nothing was published{shown}"
            )
        if step.copy_out:  # before the snapshot, from the guest as the step left it
            collect(session, step, reporter)
        results.append(StepResult(step.name, took, status.returncode))
        reporter.info(f"[green]✓ step:{step.name}[/green] ({took:.2f} s)")
    return results


def record(results: list[StepResult]) -> str:
    return json.dumps([r.__dict__ for r in results])


def run_checks(
    session: AgentSession,
    checks: Sequence[Check],
    reporter: Reporter,
    *,
    env: dict[str, str],
    workdir: str,
) -> None:
    """The Sporefile's verify: commands, against a fresh restore of the spore, with the
    top-level ``env`` and ``workdir`` (docs/sporefile.md), as the steps have them."""
    for i, check in enumerate(checks):
        label = f"verify[{i}]"
        reporter.info(f"[bold]▶ {label}[/bold]")
        out = _OutputTail(reporter, label, "stdout")
        err = _OutputTail(reporter, label, "stderr")
        status = session.exec(
            check.run, env=env, cwd=workdir, timeout=check.timeout, on_stdout=out, on_stderr=err
        ).wait()
        out.flush()
        err.flush()
        if status.returncode != 0:
            tail = "".join(f"\n  | {line}" for line in (err.lines or out.lines))
            raise StepError(
                f"{label} failed: {status.describe()}; the spore was not published{tail}"
            )
