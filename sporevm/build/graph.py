"""The build's task graph from a Sporefile up to the published spore.

    resolve:base ─► fetch:base ─► rootfs ─┐
                                   guest ─┴► boot ─► steps ─► snapshot ─► verify

(The bundle and push stages sit above both build and dist: sporevm/pipeline/.)

Every task is up to date exactly when the content it would produce is already in the
store under its content key (cachekeys.py); doit's own database only remembers task
history, never results, so a stale doit database cannot yield stale output.
"""

from __future__ import annotations

from sporevm.build.cached import Cached
from sporevm.build.context import BuildInputs, BuildOptions
from sporevm.build.progress import Reporter
from sporevm.build.remote import RemoteCache
from sporevm.build.stage_image import ImageStages
from sporevm.build.stage_vm import VmStages
from sporevm.build.tasks import Handoff, TaskRunner, TaskSpec
from sporevm.sporefile import Sporefile
from sporevm.store import Store

__all__ = ["BuildGraph", "BuildOptions"]


class BuildGraph:
    """One build: its inputs, the values its tasks hand along, and its tasks."""

    def __init__(
        self,
        sf: Sporefile,
        store: Store,
        options: BuildOptions,
        reporter: Reporter,
        remote: RemoteCache | None = None,
    ) -> None:
        self.inputs = BuildInputs.make(sf, store, options, reporter, remote)
        self.handoff = Handoff()
        self.runner = TaskRunner()
        self.cached = Cached(self.inputs, self.handoff)
        self._stages = (
            ImageStages(self.inputs, self.cached, self.handoff),
            VmStages(self.inputs, self.cached, self.handoff),
        )

    def tasks(self) -> list[TaskSpec]:
        return [t for stage in self._stages for t in stage.tasks()]
