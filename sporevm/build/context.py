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
from sporevm.build.remote import RemoteCache
from sporevm.sporefile import Sporefile
from sporevm.store import Store


@dataclass(frozen=True)
class BuildOptions:
    locked: bool = False
    no_cache: bool = False
    update_lock: bool = False
    insecure_registries: frozenset[str] = frozenset()
    until: str | None = None  # stop after this task (and what it depends on)
    cache_from: tuple[str, ...] = ()  # remote caches to restore from (URIs), flags' or
    cache_to: tuple[str, ...] = ()  # the Sporefile's; and to publish to
    cache_mode: str | None = None  # "min" | "max"; None: the Sporefile's, else min
    s3_endpoint: str | None = None  # for s3:// caches (else $SPORE_S3_ENDPOINT, else AWS's)


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
    remote: RemoteCache | None = None  # --cache-from: consulted before building locally

    @property
    def platform(self) -> str:
        return self.sf.base.platform

    @property
    def kernel(self) -> Path | None:
        return self.sf.machine.kernel_path

    @classmethod
    def make(
        cls,
        sf: Sporefile,
        store: Store,
        options: BuildOptions,
        reporter: Reporter,
        remote: RemoteCache | None = None,
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
            remote=remote,
        )
