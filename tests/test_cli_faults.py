"""Every CLI command, with an I/O error injected at one host call after another:
the user always gets one line and a non-zero exit, never a traceback or an
"internal error" (which would mean an OSError escaped as something else).

The faults are real errno values raised where the host's file calls are
(``os.*`` and ``open``), not inside spore's own code; each command runs
in-process so that hundreds of injection points stay fast.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sporevm.cli import main
from tests.test_bundle import make_spores

_CALLS = (
    "open",
    "read",
    "write",
    "pread",
    "pwrite",
    "fsync",
    "replace",
    "rename",
    "mkdir",
    "unlink",
    "listdir",
    "scandir",
    "rmdir",
    "ftruncate",
    "readlink",
    "stat",
    "lstat",
    "utime",
    "link",
    "fstat",
)
POINTS = 24  # injection points per command, spread over its host calls


class Injector:
    """Counts the host calls a command makes; raises EIO at the ``fail_at``-th one."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.count = 0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            self.count += 1
            if self.count == self.fail_at:
                raise OSError(
                    errno.EIO,
                    f"Input/output error (injected in {name})",
                    str(args[0]) if args else None,
                )
            return fn(*args, **kw)

        return call

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in _CALLS:
            if hasattr(os, name):
                mp.setattr(os, name, self.wrap(f"os.{name}", getattr(os, name)))
        wrapped = self.wrap("open", io.open)
        mp.setattr(builtins, "open", wrapped)
        mp.setattr(io, "open", wrapped)


def _run(
    argv: list[str], fail_at: int | None, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, int]:
    inj = Injector(fail_at)
    with pytest.MonkeyPatch.context() as mp:
        inj.install(mp)
        code = main(argv)
    return code, capsys.readouterr().err, inj.count


@pytest.fixture
def world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    s = make_spores(tmp_path / "w", n_children=1)
    monkeypatch.setenv("SPORE_HOME", str(s.store.root))
    monkeypatch.delenv("SPORE_TRACEBACK", raising=False)
    bundle = tmp_path / "w" / "b.bundle"
    assert (
        main(["pack", str(s.parent), "--children", str(s.children), "--out", str(bundle), "--json"])
        == 0
    )
    digest = json.loads(capsys.readouterr().out)["digest"]
    return {
        "parent": str(s.parent),
        "children": str(s.children),
        "bundle": str(bundle),
        "digest": digest,
        "tmp": tmp_path,
    }


def _commands(w: dict[str, Any], out: Path) -> dict[str, list[str]]:
    remote = out / "remote"
    return {
        "inspect": ["inspect", w["parent"]],
        "verify": ["verify", w["parent"]],
        "verify-bundle": ["verify", w["bundle"]],
        "fork": ["fork", w["parent"], "--count", "2", "--out", str(out / "forks")],
        "pack": ["pack", w["parent"], "--children", w["children"], "--out", str(out / "p")],
        "unpack": ["unpack", f"{w['bundle']}@{w['digest']}", "--out", str(out / "u.spore")],
        "push": ["push", w["bundle"], f"file://{remote}"],
        "pull": ["pull", f"file://{w['bundle']}@{w['digest']}", "--out", str(out / "q.spore")],
        "cache-ls": ["cache", "ls"],
        "cache-verify": ["cache", "verify"],
        "cache-prune": ["cache", "prune", "--older-than", "1000h", "--no-wait"],
        "cache-keep": ["cache", "keep", w["parent"]],
        "cache-roots": ["cache", "roots"],
        "graph": ["graph", str(Path(__file__).parents[1] / "examples" / "hello")],
    }


@pytest.mark.parametrize(
    "name",
    [
        "inspect",
        "verify",
        "verify-bundle",
        "fork",
        "pack",
        "unpack",
        "push",
        "pull",
        "cache-ls",
        "cache-verify",
        "cache-prune",
        "cache-keep",
        "cache-roots",
        "graph",
    ],
)
def test_injected_io_errors_give_one_line(
    world: dict[str, Any], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch = world["tmp"] / "scratch"

    def fresh() -> list[str]:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        return _commands(world, scratch)[name]

    code, err, total = _run(fresh(), None, capsys)
    assert code == 0 and total > 0, err
    points = sorted({1 + (i * total) // POINTS for i in range(POINTS)} | {total})
    failures = 0
    for at in points:
        code, err, _ = _run(fresh(), at, capsys)
        assert "Traceback" not in err and "internal error" not in err, (at, err)
        if code != 0:
            failures += 1
            lines = err.strip().splitlines()
            assert lines and lines[-1].startswith("spore: error: "), (at, err)
            assert "\n" not in lines[-1]
            left = [p.name for p in scratch.rglob(".tmp*")]
            assert not left, (at, err, left)  # nothing half-written stays visible
    assert failures > 0  # the injection reached the command
