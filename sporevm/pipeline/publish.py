"""The publish stages after the build graph: pack the spore into a bundle, push it.

    verify ─► bundle ─► push

They use sporevm.dist, which the build floor may not import; so they live here, above both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from sporevm.build import cachekeys
from sporevm.build.cached import Cached
from sporevm.build.context import BuildInputs
from sporevm.build.stage_vm import Published
from sporevm.build.tasks import Handoff, TaskSpec
from sporevm.dist import bundle as bundle_mod
from sporevm.dist.uri import BundleURI
from sporevm.errors import SporeError

if TYPE_CHECKING:  # loaded only when a build names a cache
    from sporevm.pipeline.remote_cache import RemoteCaches


@dataclass(frozen=True)
class Bundled:
    """bundle → push, and the build's result: the bundle directory and its digest."""

    path: Path
    digest: str


@dataclass(frozen=True)
class Pushed:
    references: tuple[str, ...]  # pinned references, one per push: URI


def bundle_key(manifest_id: str) -> str:
    """A bundle is a pure function of the published spore's manifest (and the format)."""
    return blake3.blake3(
        f"spore/bundle-key/v1\0{bundle_mod.FORMAT}\0{manifest_id}".encode()
    ).hexdigest()


class PublishStages:
    def __init__(
        self,
        inputs: BuildInputs,
        cached: Cached,
        handoff: Handoff,
        caches: RemoteCaches | None = None,
    ) -> None:
        self.inputs, self.cached, self.handoff = inputs, cached, handoff
        self.caches = caches if caches is not None and caches.sinks else None

    def tasks(self) -> list[TaskSpec]:
        sf = self.inputs.sf
        out = [
            TaskSpec(
                "bundle",
                f"pack {sf.output.spore} into {sf.output.bundle}",
                self.bundle,
                lambda: self.existing_bundle() is not None,
                ("verify",),
            )
        ]
        if sf.push:
            # Pushed every time: cheap when the destination has it, and never trusts a record.
            out.append(
                TaskSpec(
                    "push",
                    "push the bundle to " + ", ".join(sf.push),
                    self.push,
                    False,
                    ("bundle",),
                )
            )
        if self.caches is not None:
            # Every time, like push: cheap when the caches have it (pointers are checked
            # first), and a cache emptied meanwhile is filled again.
            out.append(
                TaskSpec(
                    "cache",
                    "store the kernel and step snapshots in "
                    + ", ".join(str(c) for c in self.caches.sinks)
                    + f" (mode {self.caches.mode})",
                    self.cache,
                    False,
                    ("verify",),
                )
            )
        return out

    def cache(self) -> None:
        caches = self.caches
        keys = self.cached.chain_keys()
        if caches is None or keys is None:
            return
        caches.publish_guest()
        steps = len(self.inputs.sf.steps)
        if caches.mode == "max":
            wanted = list(range(1, steps + 1))
        else:
            wanted = sorted({cachekeys.after_index(self.inputs.sf), steps} - {0})
        caches.publish_steps(keys, wanted)

    def _spore_manifest(self) -> str | None:
        """The spore verify published in this build, else the one it found up to date."""
        published = self.handoff.get(Published)
        if published is not None:
            return published.manifest_id
        keys = self.cached.chain_keys()
        return self.cached.published_spore(keys[-1]) if keys else None

    def existing_bundle(self) -> Bundled | None:
        """The bundle in output.bundle if it is the one recorded for this spore and whole."""
        mid = self._spore_manifest()
        rec = self.inputs.store.get_key("bundle", bundle_key(mid)) if mid else None
        if rec is None:
            return None
        layout = _recorded_layout(rec)
        out = self.inputs.sf.output.bundle
        try:
            if layout is None:  # a record from before layouts were kept: read it all
                files, digest = bundle_mod.read_metadata(
                    lambda name, limit: _read_bounded(out / name, limit)
                )
                layout = _layout(files)
            else:
                # Only the very metadata bytes recorded (the digest covers them all): no
                # schema pass, so an unchanged build loads no jsonschema.
                names, _ = layout
                budget = [bundle_mod.MAX_METADATA]
                digest = bundle_mod.identity([(n, _read_budget(out / n, budget)) for n in names])
        except (OSError, SporeError):
            return None
        if digest != rec.get("digest") or not all(
            (out / n).is_file() and (out / n).stat().st_size == size for n, size in layout[1]
        ):
            return None
        return Bundled(out, digest)

    def bundle(self) -> None:
        from sporevm.dist.pack import pack

        sf, store = self.inputs.sf, self.inputs.store
        res = pack(str(sf.output.spore), None, sf.output.bundle, store)
        files, digest = bundle_mod.read_metadata(
            lambda name, limit: _read_bounded(sf.output.bundle / name, limit)
        )
        names, pieces = _layout(files)
        # "manifest": prune keeps this record while the spore it packs is live. "metadata"
        # and "pieces": what the next build checks instead of parsing the bundle again.
        store.put_key(
            "bundle",
            bundle_key(res.parent),
            {
                "digest": res.digest,
                "manifest": res.parent,
                "metadata": names,
                "pieces": [[n, size] for n, size in pieces],
            },
        )
        self.handoff.give(Bundled(Path(res.path), res.digest))
        self.inputs.reporter.info(
            f"bundle  {res.path}  {res.digest}  ({res.objects} objects in "
            f"{res.packs} pack(s), {res.bytes >> 20} MiB)"
        )

    def push(self) -> None:
        """Each push: URI, skipped when the destination already holds this very bundle
        (its metadata hashes to our digest: every transport writes metadata last)."""
        from sporevm.dist.push import push
        from sporevm.dist.transports import open_sink
        from sporevm.dist.uri import parse_push_uri

        bundle_dir = self.inputs.sf.output.bundle
        digest = self._bundle_digest(bundle_dir)
        refs: list[str] = []
        for text in self.inputs.sf.push:
            uri = parse_push_uri(text)
            there = _already_there(uri, digest) if digest else None
            if there is not None:
                refs.append(there)
                self.inputs.reporter.info(f"pushed  {there} (already there: nothing sent)")
                continue
            res = push(bundle_dir, open_sink(uri))
            refs.append(res.reference)
            self.inputs.reporter.info(f"pushed  {res.reference}")
        self.handoff.give(Pushed(tuple(refs)))

    def _bundle_digest(self, bundle_dir: Path) -> str | None:
        bundled = self.handoff.get(Bundled) or self.existing_bundle()
        return bundled.digest if bundled is not None else None


def _already_there(uri: BundleURI, digest: str) -> str | None:
    """The pinned reference of ``uri`` if it already holds the bundle ``digest``."""
    from sporevm.dist.transports import open_source

    if uri.scheme == "oci" and uri.tag is None:
        return None  # pushed by digest: nothing names it before the push (blobs dedupe)
    try:
        source = open_source(uri)
        _, there = bundle_mod.read_metadata(source.read_small)
    except (SporeError, OSError):
        return None
    if there != digest:
        return None
    return source.reference if uri.scheme == "oci" else str(uri.with_pin(digest))


# A bundle's own relative names (bundle.json, packs/000000.pack, manifests/<hex>.json):
# each component starts with a letter or digit, so none is "..".
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}(?:/[a-z0-9][a-z0-9._-]{0,127})?")


def _layout(files: list[tuple[str, bytes]]) -> tuple[list[str], list[tuple[str, int]]]:
    """Metadata names in identity order, and every pack and rootfs segment with its size."""
    meta = bundle_mod.assemble(files)
    pieces = [(p.name, p.size) for p in meta.chunkpack.packs]
    pieces += [(s.name, s.size) for img in meta.rootfs.images for s in img.segments]
    return [n for n, _ in files], pieces


def _recorded_layout(rec: dict[str, Any]) -> tuple[list[str], list[tuple[str, int]]] | None:
    names, pieces = rec.get("metadata"), rec.get("pieces")
    if not (isinstance(names, list) and isinstance(pieces, list)) or not names:
        return None
    if not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
        return None
    out: list[tuple[str, int]] = []
    for p in pieces:
        if not (
            isinstance(p, list)
            and len(p) == 2
            and isinstance(p[0], str)
            and _NAME.fullmatch(p[0])
            and type(p[1]) is int
            and p[1] >= 0
        ):
            return None
        out.append((p[0], p[1]))
    return names, out


def _read_budget(path: Path, budget: list[int]) -> bytes:
    data = _read_bounded(path, budget[0])
    budget[0] -= len(data)
    return data


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise SporeError(f"{path}: larger than {limit} bytes")
    return data
