"""dodo.py drives the graph `spore graph` describes; sporefile.schema.json is one schema.

No VM here: `doit list` only loads the graph. Building through doit is the same code
path as `spore build` (pipeline.driver.prepare + Pipeline), which test_build.py exercises.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from doit.exceptions import TaskFailed

from sporevm.build.tasks import TaskRunner
from sporevm.pipeline.driver import describe
from sporevm.store import Store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "hello" / "Sporefile"
SCHEMA = ROOT / "sporefile.schema.json"


def doit(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPORE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "doit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def listed(home: Path, *args: str) -> list[str]:
    res = doit(home, *args, "list", "--quiet", "--sort", "definition")
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def graph_names(path: Path, home: Path) -> list[str]:
    return [t["name"] for t in describe(path, Store(home))["tasks"]]


def test_doit_list_names_the_spore_graph_tasks(tmp_path: Path) -> None:
    assert listed(tmp_path) == graph_names(EXAMPLE, tmp_path)  # default: examples/hello
    assert "verify" in listed(tmp_path)


def test_doit_sporefile_variable_picks_the_sporefile(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy(ROOT / "tests" / "sporefiles" / "valid" / "push.yaml", ctx / "Sporefile")
    names = listed(tmp_path / "home", f"sporefile={ctx}")  # a directory works, as for spore
    assert names == graph_names(ctx / "Sporefile", tmp_path / "home")
    assert names[-1] == "push" and "push" not in listed(tmp_path / "home")


def test_doit_refuses_a_missing_or_bad_sporefile_in_one_line(tmp_path: Path) -> None:
    res = doit(tmp_path, f"sporefile={tmp_path / 'nope'}", "list")
    assert res.returncode == 3 and res.stderr.count("\n") == 1, res.stderr
    assert "no Sporefile there" in res.stderr
    (tmp_path / "Sporefile").write_text("sporefile: 1\nname: App\nbase: {image: x}\n")
    res = doit(tmp_path, f"sporefile={tmp_path}", "list")
    assert res.returncode == 3 and res.stderr.count("\n") == 1, res.stderr
    assert ":2:7: name:" in res.stderr and "Traceback" not in res.stderr


def test_actions_refuse_to_run_in_a_forked_doit_worker(tmp_path: Path) -> None:
    # doit -P process forks workers that lack the state tasks hand along (the build VM).
    runner = TaskRunner()
    ran: list[bool] = []
    assert runner.wrap(lambda: ran.append(True))() is None and ran == [True]
    runner.pid = -1
    failed = runner.wrap(lambda: ran.append(True))()
    assert isinstance(failed, TaskFailed) and ran == [True]
    assert "one process" in str(failed)


def test_package_ships_the_root_schema() -> None:
    # The root file is the one to edit; the package keeps a byte-identical copy so an
    # installed (non-editable) spore finds it as package data.
    shipped = importlib.resources.files("sporevm").joinpath("sporefile.schema.json")
    assert shipped.read_bytes() == SCHEMA.read_bytes(), (
        "sporevm/sporefile.schema.json differs from sporefile.schema.json at the root; "
        "edit the root file and run: cp sporefile.schema.json sporevm/"
    )
    assert json.loads(SCHEMA.read_bytes())["$id"] == "https://sporevm.dev/schemas/sporefile-1.json"


def test_example_points_editors_at_the_root_schema() -> None:
    for path in sorted((ROOT / "examples").rglob("Sporefile")):
        first = path.read_text().splitlines()[0]
        m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert m, f"{path}: first line should be the yaml-language-server $schema comment"
        assert (path.parent / m.group(1)).resolve() == SCHEMA
