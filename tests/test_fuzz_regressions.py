"""Replay every seed and every kept crash input through its fuzz target, in-process.

``scripts/fuzz`` keeps each input that crashed, hung or blew memory as
``fuzz/regressions/<target>/<name>``; together with the seed corpora
(``fuzz/corpus/<target>/``) they run here on every test run, without atheris
instrumentation (``instrument_imports`` becomes a no-op while the target
loads), so a fixed bug stays fixed and a seed that stops passing is noticed
without a fuzzing run. Each input gets the same 20 s bound libFuzzer's
``-timeout`` gives it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType

import atheris
import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
INPUT_DEADLINE_S = 20


class InputTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so a target's `except Exception` cannot eat it."""


def _alarm(_sig: int, _frame: FrameType | None) -> None:
    raise InputTimeout(f"input ran longer than {INPUT_DEADLINE_S} s")


def load_target(path: Path) -> Callable[[bytes], None]:
    """Import a fuzz target file as a module and return its TestOneInput, uninstrumented."""
    spec = importlib.util.spec_from_file_location(f"fuzz_target_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    original = atheris.instrument_imports
    atheris.instrument_imports = contextlib.nullcontext  # plain imports, no coverage hooks
    try:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        atheris.instrument_imports = original
    fn = getattr(module, "TestOneInput", None)
    assert callable(fn), f"{path.name} has no TestOneInput"
    return fn  # type: ignore[no-any-return]


def inputs(name: str) -> Iterator[Path]:
    for kind in ("corpus", "regressions"):
        d = FUZZ / kind / name
        if d.is_dir():
            yield from sorted(p for p in d.rglob("*") if p.is_file())


def replay(
    one_input: Callable[[bytes], None], files: list[Path], seconds: float = INPUT_DEADLINE_S
) -> None:
    """Run every file through the target; the first failure or overrun raises AssertionError."""
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for path in files:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                one_input(path.read_bytes())
            except BaseException as e:
                raise AssertionError(f"{path}: {type(e).__name__}: {e}") from e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)


def test_targets_found() -> None:
    assert len(TARGETS) >= 14


@pytest.mark.parametrize("name", TARGETS)
def test_replay_seeds_and_regressions(name: str) -> None:
    one_input = load_target(FUZZ / f"fuzz_{name}.py")
    files = list(inputs(name))
    assert files, f"fuzz/corpus/{name}/ holds no seed input"
    replay(one_input, files)


def test_regressions_belong_to_targets() -> None:
    """A regression kept for a target that was renamed or removed would silently stop running."""
    reg = FUZZ / "regressions"
    stray = (
        sorted(p.name for p in reg.iterdir() if p.is_dir() and p.name not in TARGETS)
        if reg.is_dir()
        else []
    )
    assert stray == []


_BOOM = """
import sys
import atheris
with atheris.instrument_imports():
    import json
def TestOneInput(data: bytes) -> None:
    if data.startswith(b"B"):
        raise ValueError("boom")
    while data.startswith(b"H"):
        pass
"""


def test_replay_fails_on_a_crashing_or_hanging_input(tmp_path: Path) -> None:
    """The replay really runs the target: a crashing and a hanging input both fail it."""
    target = tmp_path / "fuzz_boom.py"
    target.write_text(_BOOM)
    one_input = load_target(target)
    files = []
    for name, data in (("ok", b"fine"), ("crash-1", b"Boom"), ("timeout-1", b"Hang")):
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    replay(one_input, files[:1], seconds=1)
    with pytest.raises(AssertionError, match="crash-1: ValueError: boom"):
        replay(one_input, files[:2], seconds=1)
    with pytest.raises(AssertionError, match="timeout-1: InputTimeout"):
        replay(one_input, [files[2]], seconds=0.2)
