"""What every task of one build reads and none writes: the Sporefile, the store, the
options, and what follows from them before any task runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sporevm.build import lockfile
from sporevm.build.fileslayer import FilesLayer, files_layer
from sporevm.build.oci import OCIClient
from sporevm.build.ociref import ImageRef, parse_ref
from sporevm.build.progress import Reporter
from sporevm.sporefile import Sporefile
from sporevm.store import Store


@dataclass(frozen=True)
class BuildOptions:
    locked: bool = False
    no_cache: bool = False
    update_lock: bool = False
    insecure_registries: frozenset[str] = frozenset()
    until: str | None = None  # stop after this task (and what it depends on)


@dataclass(frozen=True)
class BuildInputs:
    sf: Sporefile
    store: Store
    options: BuildOptions
    reporter: Reporter
    lock_path: Path
    ref: ImageRef
    client: OCIClient
    files: FilesLayer | None

    @property
    def platform(self) -> str:
        return self.sf.base.platform

    @property
    def kernel(self) -> Path | None:
        return self.sf.machine.kernel_path

    @classmethod
    def make(
        cls, sf: Sporefile, store: Store, options: BuildOptions, reporter: Reporter
    ) -> BuildInputs:
        return cls(
            sf=sf,
            store=store,
            options=options,
            reporter=reporter,
            lock_path=lockfile.lock_path(sf.path),
            ref=parse_ref(sf.base.image, sf.context),
            client=OCIClient(store, insecure_registries=options.insecure_registries),
            files=files_layer(sf.files, sf.context, sf.path, (sf.output.spore, sf.output.bundle)),
        )
