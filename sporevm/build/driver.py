"""Run a Sporefile's task graph (graph.py) with doit, and describe it for ``spore graph``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from doit.cmd_base import TaskLoader2
from doit.doit_cmd import DoitMain
from doit.task import Task, dict_to_task

from sporevm import sporefile as sporefile_mod
from sporevm import storeroots
from sporevm.build import doitstate, lockfile
from sporevm.build.graph import BuildOptions, BuildResult, _Build
from sporevm.build.imagefs import RootfsRecord
from sporevm.build.progress import Reporter
from sporevm.errors import LockMismatchError, SporeError, SporefileError, UsageError
from sporevm.sporefile import Sporefile
from sporevm.store import Store


class _Loader(TaskLoader2):  # type: ignore[misc]
    def __init__(self, build: _Build):
        super().__init__()
        self.build = build

    def load_doit_config(self) -> dict[str, Any]:
        build = self.build

        class BoundReporter(build.reporter.doit_reporter_class()):  # type: ignore[misc]
            pass

        return {
            **doit_config(build),
            "reporter": BoundReporter,
            "verbosity": 2,  # do not capture: actions stream step output themselves
        }

    def load_tasks(self, cmd: Any, pos_args: list[str]) -> list[Task]:
        return [dict_to_task(t) for t in self.build.tasks()]


def prepare(path: Path, store: Store, options: BuildOptions, reporter: Reporter) -> _Build:
    """Load the Sporefile and check what must hold before any task runs.

    Shared by ``spore build`` and the repository's dodo.py, so both run one graph."""
    sf = sporefile_mod.load(path)
    b = _Build(sf, store, options, reporter)
    names = [t["name"] for t in b.tasks()]
    if options.until is not None and options.until not in names:
        raise UsageError(f"--until {options.until}: no such task; tasks are: {', '.join(names)}")
    if options.locked and lockfile.load(b.lock_path).find(sf.base.image, sf.base.platform) is None:
        raise LockMismatchError(
            f"{b.lock_path}: --locked, but the lock has no entry for "
            f"{sf.base.image} ({sf.base.platform}); run without --locked first"
        )
    _check_push_uris(sf)
    if b.files is not None:
        b.files.check()  # before any work: sources readable, no symlinks, no conflicting dst
    return b


def doit_config(b: _Build) -> dict[str, Any]:
    """Where doit keeps a Sporefile's task history: one file per Sporefile, in the store.

    History only (every task asks the store whether it is up to date); written atomically
    by the spore-json backend, so a killed build leaves no torn file."""
    state = b.store.root / "state"
    state.mkdir(exist_ok=True)
    ident = hashlib.sha256(str(b.sf.path.resolve()).encode()).hexdigest()[:24]
    return {"dep_file": str(state / f"{ident}.doit.json"), "backend": doitstate.BACKEND}


def build(path: Path, store: Store, options: BuildOptions, reporter: Reporter) -> BuildResult:
    b = prepare(path, store, options, reporter)
    sf = b.sf
    argv = ["run"] + (["--always-execute"] if options.no_cache else [])
    if options.until is not None:
        argv.append(options.until)
    # The result is read from the store under the same lock: a prune waiting for this
    # build must not remove what the build is about to report.
    with store.lock():
        try:
            loader = _Loader(b)
            code = DoitMain(loader, extra_config=doitstate.PLUGIN).run(argv)
        finally:
            if b.vm is not None:
                b.vm.close()
        b.result.tasks = dict(reporter.statuses)
        if b.error is not None:
            raise b.error
        if code != 0:
            raise SporeError(f"build of {sf.path} failed in the task graph (doit exit {code})")
        entry = b.locked_entry()  # absent when --until stopped before resolve (e.g. guest)
        if entry is not None:
            b.result.image, b.result.manifest = entry.digest, entry.manifest
            if b.result.rootfs is None:
                b.result.rootfs = RootfsRecord.lookup(store, b.rootfs_cache_key())
        if b.result.spore is None and options.until in (None, "verify"):
            keys = b.chain_keys()
            if keys:
                rec = store.get_key("spore", b.spore_key(keys[-1]))
                if rec is not None and b.spore_uptodate(keys[-1]):
                    b.result.spore = str(sf.output.spore)
                    b.result.manifest_id = rec.get("manifest")
                    # A spore published before roots existed (or whose record was
                    # dropped) becomes one now; unchanged records are not rewritten.
                    storeroots.add(
                        store.root, storeroots.root_for(sf.output.spore, str(rec["manifest"]))
                    )
        if b.result.bundle is None and options.until in (None, "bundle", "push"):
            b.bundle_uptodate()
    return b.result


def _check_push_uris(sf: Sporefile) -> None:
    from sporevm.dist.uri import parse_push_uri

    for i, uri in enumerate(sf.push):
        try:
            parse_push_uri(uri)
        except SporeError as exc:
            raise SporefileError(f"{sf.path}: push.{i}: {exc}") from None


def describe(path: Path, store: Store) -> dict[str, Any]:
    """The DAG for `spore graph`: tasks, their docs and dependencies."""
    sf = sporefile_mod.load(path)
    b = _Build(sf, store, BuildOptions(), Reporter.quiet())
    nodes: list[dict[str, Any]] = [
        {"name": t["name"], "doc": t["doc"], "deps": t.get("task_dep", [])} for t in b.tasks()
    ]
    return {"sporefile": str(sf.path), "tasks": nodes}
