"""`copy_out:` in a Sporefile step: parsed, checked, and keyed only when present."""

from __future__ import annotations

from pathlib import Path

import pytest

from sporevm.errors import SporefileError
from sporevm.sporefile import canonical_step, loads

HEAD = "sporefile: 1\nname: app\nbase: {image: debian:bookworm}\nsteps:\n"


def test_copy_out_parsed(tmp_path: Path) -> None:
    sf = loads(
        HEAD + "  - {name: b, run: make, copy_out: [{src: /work/dist/, dst: dist/}]}\n",
        tmp_path / "Sporefile",
    )
    (art,) = sf.steps[0].copy_out
    assert (art.src, art.dst, art.path) == ("/work/dist", "dist", tmp_path / "out" / "dist")
    assert b'"copy_out"' in canonical_step(sf.steps[0])


def test_steps_without_artifacts_keep_their_keys(tmp_path: Path) -> None:
    sf = loads(HEAD + "  - {name: b, run: make}\n", tmp_path / "Sporefile")
    assert b"copy_out" not in canonical_step(sf.steps[0])


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("{src: /a, dst: ../up}", "copy_out"),
        ("{src: /a, dst: /abs}", "copy_out"),
        ("{src: rel, dst: d}", "src"),
        ("{src: /a, dst: app.spore}", "overlaps"),
        ("{src: /a}", "dst"),
    ],
)
def test_bad_entries(tmp_path: Path, entry: str, match: str) -> None:
    with pytest.raises(SporefileError, match=match):
        loads(HEAD + f"  - {{name: b, run: make, copy_out: [{entry}]}}\n", tmp_path / "Sporefile")


def test_overlaps_and_background(tmp_path: Path) -> None:
    two = (
        "  - {name: a, run: x, copy_out: [{src: /a, dst: d}]}\n"
        "  - {name: b, run: y, copy_out: [{src: /b, dst: d/sub}]}\n"
    )
    with pytest.raises(SporefileError, match="overlaps"):
        loads(HEAD + two, tmp_path / "Sporefile")
    bg = "  - {name: a, run: x, background: true, copy_out: [{src: /a, dst: d}]}\n"
    with pytest.raises(SporefileError, match="background"):
        loads(HEAD + bg, tmp_path / "Sporefile")
