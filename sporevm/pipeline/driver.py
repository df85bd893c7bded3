"""Run a Sporefile's whole pipeline with doit, and describe it for ``spore graph``.

    build graph (sporevm.build.graph) ─► bundle ─► push (publish.py)

``spore build`` and the repository's dodo.py both call ``prepare``, so both run one graph.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit import plugin as doit_plugin
from doit.cmd_base import TaskLoader2
from doit.doit_cmd import DoitMain
from doit.task import Task, dict_to_task

from sporevm import sporefile as sporefile_mod
from sporevm import storeroots
from sporevm.build import doitstate, lockfile
from sporevm.build.graph import BuildGraph, BuildOptions
from sporevm.build.imagefs import RootfsRecord
from sporevm.build.progress import Reporter
from sporevm.build.stage_vm import Published
from sporevm.build.tasks import TaskSpec
from sporevm.errors import LockMismatchError, SporeError, SporefileError, UsageError
from sporevm.pipeline.publish import Bundled, PublishStages, Pushed
from sporevm.sporefile import Sporefile
from sporevm.store import Store

if TYPE_CHECKING:  # loaded only when a build names a cache
    from sporevm.pipeline.remote_cache import CacheLocation, RemoteCaches


@dataclass
class BuildResult:
    sporefile: Path
    lock: Path
    image: str = ""
    manifest: str = ""
    rootfs: RootfsRecord | None = None
    tasks: dict[str, str] = field(default_factory=dict)  # task -> executed | up-to-date | failed
    spore: str | None = None
    manifest_id: str | None = None
    bundle: str | None = None
    bundle_digest: str | None = None
    pushed: list[str] = field(default_factory=list)  # pinned references, one per push: URI
    cache: dict[str, int] | None = None  # bytes received from / sent to remote caches

    def to_json(self) -> dict[str, Any]:
        return {
            "sporefile": str(self.sporefile),
            "lock": str(self.lock),
            "image": self.image,
            "manifest": self.manifest,
            "rootfs": self.rootfs.to_json() if self.rootfs else None,
            "tasks": self.tasks,
            "spore": self.spore,
            "manifest_id": self.manifest_id,
            "bundle": self.bundle,
            "bundle_digest": self.bundle_digest,
            "pushed": self.pushed,
            "cache": self.cache,
        }


class Pipeline(BuildGraph):
    """The build graph followed by the publish stages."""

    def __init__(
        self,
        sf: Sporefile,
        store: Store,
        options: BuildOptions,
        reporter: Reporter,
        caches: RemoteCaches | None = None,
    ) -> None:
        reads = caches if caches is not None and caches.sources else None
        super().__init__(sf, store, options, reporter, reads)
        self.caches = caches
        self.publish = PublishStages(self.inputs, self.cached, self.handoff, caches)

    def tasks(self) -> list[TaskSpec]:
        return [*super().tasks(), *self.publish.tasks()]

    def doit_tasks(self) -> list[dict[str, Any]]:
        return [t.to_doit(self.runner) for t in self.tasks()]

    def close(self) -> None:
        """Stop a build VM no task took (a run that stopped after boot)."""
        self.handoff.close()


class StoreVerdicts:
    """Sporefiles the schema passed before, remembered in the store (sporefile_schema)."""

    KIND = "sporefile-valid"

    def __init__(self, store: Store) -> None:
        self.store = store

    def known_valid(self, key: str) -> bool:
        return self.store.get_key(self.KIND, key) is not None

    def record_valid(self, key: str) -> None:
        self.store.put_key(self.KIND, key, {})


class _Loader(TaskLoader2):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self.pipeline = pipeline

    def load_doit_config(self) -> dict[str, Any]:
        p = self.pipeline

        class BoundReporter(p.inputs.reporter.doit_reporter_class()):  # type: ignore[misc]
            pass

        return {
            **doit_config(p),
            "reporter": BoundReporter,
            "verbosity": 2,  # do not capture: actions stream step output themselves
        }

    def load_tasks(self, cmd: Any, pos_args: list[str]) -> list[Task]:
        return [dict_to_task(t) for t in self.pipeline.doit_tasks()]


def prepare(path: Path, store: Store, options: BuildOptions, reporter: Reporter) -> Pipeline:
    """Load the Sporefile and check what must hold before any task runs."""
    sf = sporefile_mod.load(path, StoreVerdicts(store))
    p = Pipeline(sf, store, options, reporter, remote_caches(sf, store, options, reporter))
    names = [t.name for t in p.tasks()]
    if options.until is not None and options.until not in names:
        raise UsageError(f"--until {options.until}: no such task; tasks are: {', '.join(names)}")
    lock_path = p.inputs.lock_path
    if options.locked and lockfile.load(lock_path).find(sf.base.image, sf.base.platform) is None:
        raise LockMismatchError(
            f"{lock_path}: --locked, but the lock has no entry for "
            f"{sf.base.image} ({sf.base.platform}); run without --locked first"
        )
    check_push_uris(sf)
    if p.inputs.files is not None:
        p.inputs.files.check()  # before any work: sources readable, no symlinks, no conflicts
    return p


def doit_config(p: Pipeline) -> dict[str, Any]:
    """Where doit keeps a Sporefile's task history: one file per Sporefile, in the store.

    History only (every task asks the store whether it is up to date); written atomically
    by the spore-json backend, so a killed build leaves no torn file."""
    state = p.inputs.store.root / "state"
    state.mkdir(exist_ok=True)
    ident = hashlib.sha256(str(p.inputs.sf.path.resolve()).encode()).hexdigest()[:24]
    return {"dep_file": str(state / f"{ident}.doit.json"), "backend": doitstate.BACKEND}


def build(path: Path, store: Store, options: BuildOptions, reporter: Reporter) -> BuildResult:
    p = prepare(path, store, options, reporter)
    argv = ["run"] + (["--always-execute"] if options.no_cache else [])
    if options.until is not None:
        argv.append(options.until)
    # The result is read from the store under the same lock: a prune waiting for this
    # build must not remove what the build is about to report.
    with store.lock():
        try:
            with _no_installed_doit_plugins():
                code = DoitMain(_Loader(p), extra_config=doitstate.PLUGIN).run(argv)
            if p.runner.bug is not None:
                raise p.runner.bug
            if p.runner.error is not None:
                raise p.runner.error
            if code != 0:
                raise SporeError(
                    f"build of {p.inputs.sf.path} failed in the task graph (doit exit {code})"
                )
            return _result(p, dict(reporter.statuses))
        finally:
            p.close()


@contextlib.contextmanager
def _no_installed_doit_plugins() -> Iterator[None]:
    """``spore build`` runs doit with its own plugins only (doitstate.PLUGIN).

    doit also loads every COMMAND, BACKEND and REPORTER entry point of every installed
    distribution: a package installed beside spore could then change how a build runs,
    and the scan costs a no-op build about 15 ms. doit's own seam for it is
    ``plugin.entry_points_impl``; dodo.py (doit's command line) keeps doit's behaviour."""

    def none(group: str) -> tuple[()]:
        return ()

    saved = doit_plugin.entry_points_impl
    doit_plugin.entry_points_impl = lambda: none
    try:
        yield
    finally:
        doit_plugin.entry_points_impl = saved


def _result(p: Pipeline, statuses: dict[str, str]) -> BuildResult:
    """What the tasks handed on; for tasks that were up to date, what the store holds."""
    sf, store, until = p.inputs.sf, p.inputs.store, p.inputs.options.until
    res = BuildResult(sporefile=sf.path, lock=p.inputs.lock_path, tasks=statuses)
    entry = p.cached.locked_entry()  # absent when --until stopped before resolve (e.g. guest)
    if entry is not None:
        res.image, res.manifest = entry.digest, entry.manifest
        res.rootfs = p.handoff.get(RootfsRecord) or p.cached.rootfs()
    published = p.handoff.get(Published)
    if published is None and until in (None, "verify", "bundle", "push"):
        keys = p.cached.chain_keys()
        mid = p.cached.published_spore(keys[-1]) if keys else None
        if mid is not None:
            published = Published(sf.output.spore, mid)
            # A spore published before roots existed (or whose record was dropped)
            # becomes one now; unchanged records are not rewritten.
            storeroots.add(store.root, storeroots.root_for(sf.output.spore, mid))
    if published is not None:
        res.spore, res.manifest_id = str(published.path), published.manifest_id
    bundled = p.handoff.get(Bundled)
    if bundled is None and until in (None, "bundle", "push"):
        bundled = p.publish.existing_bundle()
    if bundled is not None:
        res.bundle, res.bundle_digest = str(bundled.path), bundled.digest
    pushed = p.handoff.get(Pushed)
    res.pushed = list(pushed.references) if pushed else []
    if p.caches is not None:
        res.cache = {"received": p.caches.bytes_received, "sent": p.caches.bytes_sent}
    return res


def remote_caches(
    sf: Sporefile, store: Store, options: BuildOptions, reporter: Reporter
) -> RemoteCaches | None:
    """--cache-from/--cache-to/--cache-mode, else the Sporefile's cache: (flags win)."""
    froms = options.cache_from or sf.cache.sources
    tos = options.cache_to or sf.cache.sinks
    if not froms and not tos:
        return None
    from sporevm.pipeline.remote_cache import RemoteCaches, parse_cache_uri

    def parse(texts: tuple[str, ...], push: bool, flag: bool) -> list[CacheLocation]:
        out = []
        for n, text in enumerate(texts):
            try:
                out.append(parse_cache_uri(text, for_push=push, s3_endpoint=options.s3_endpoint))
            except SporeError as exc:
                if flag:
                    raise
                field = "to" if push else "from"
                raise SporefileError(f"{sf.path}: cache.{field}.{n}: {exc}") from None
        return out

    return RemoteCaches(
        store,
        reporter,
        parse(froms, False, bool(options.cache_from)),
        parse(tos, True, bool(options.cache_to)),
        options.cache_mode or sf.cache.mode or "max",
    )


def check_push_uris(sf: Sporefile) -> None:
    from sporevm.dist.uri import parse_push_uri

    for i, uri in enumerate(sf.push):
        try:
            parse_push_uri(uri)
        except SporeError as exc:
            raise SporefileError(f"{sf.path}: push.{i}: {exc}") from None


def describe(path: Path, store: Store) -> dict[str, Any]:
    """The DAG for `spore graph`: tasks, their docs and dependencies."""
    sf = sporefile_mod.load(path)
    p = Pipeline(sf, store, BuildOptions(), Reporter.quiet())
    nodes = [{"name": t.name, "doc": t.doc, "deps": list(t.deps)} for t in p.tasks()]
    return {"sporefile": str(sf.path), "tasks": nodes}
