"""Boot and step keys, and running a Sporefile's steps in a booted VM through the agent.

    key(boot)   = BLAKE3(domain, rootfs, kernel, initrd, cmdline, machine, device model)
    key(step i) = BLAKE3(domain, key(step i-1), canonical step i, digests of its files)

Each key names the snapshot taken after that step (graph.py): a changed step
resumes the snapshot of the step before it. The domain's version changes when
what a snapshot holds changes, so older cached snapshots become misses, never
hits: v2 snapshots are taken only once the guest has settled (vmm/quiesce.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from sporevm.build.guest import GuestPlatform
from sporevm.build.progress import Reporter
from sporevm.errors import SporeError
from sporevm.runtime.agent import ProbeKind
from sporevm.runtime.agent_messages import Command as AgentCommand
from sporevm.runtime.agent_messages import Probe
from sporevm.runtime.agent_session import AgentSession, ExecHandle
from sporevm.spore.platform import DEVICE_MODEL
from sporevm.sporefile import (
    Check,
    ReadyProbe,
    Sporefile,
    Step,
    canonical_machine,
    canonical_step,
)

TAIL_LINES = 20


class StepError(SporeError):
    """A build step failed; nothing of this build was published."""


def _key(*parts: bytes) -> str:
    h = blake3.blake3()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def boot_key(sf: Sporefile, rootfs_digest: str, guest: GuestPlatform) -> str:
    return _key(
        b"spore/boot-key/v2",
        rootfs_digest.encode(),
        guest.kernel_digest.encode(),
        guest.initrd_digest.encode(),
        guest.cmdline.encode(),
        canonical_machine(sf.machine),
        DEVICE_MODEL.encode(),
    )


def step_keys(sf: Sporefile, boot: str) -> list[str]:
    keys: list[str] = []
    prev = boot
    for step in sf.steps:
        prev = _key(b"spore/step-key/v1", prev.encode(), canonical_step(step))
        keys.append(prev)
    return keys


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
