"""A build cache shared between machines: ``spore build --cache-from/--cache-to URI``.

Layout under a cache URI (file:///ABS, s3://BUCKET[/PREFIX], oci://HOST[:PORT]/REPO;
http(s):// read-only), every name written by exactly one kind of writer:

    objects/<hex>      an entry, content-addressed by its own digest: a bundle (step
                       snapshots; parent and children share their chunks) or a guest
                       entry (managed kernel + agent initramfs, cache_entry.py)
    step-<key>         a pointer (ref.json) for a step key: which object, which manifest
    guest-<key>        a pointer for a guest key (host class, kernel inputs, agent)

On oci:// an object is an artifact pushed by digest and a pointer is a tag. Objects are
immutable, so two runners pushing the same key at once each publish whole objects and
the pointer names one of them; a reader never sees a mix. Everything read back is
untrusted: pointers and entries are decoded strictly, objects are pulled pinned and
verified (bundles by dist.pull, guest files by sha256 and then BLAKE3), the platform
contract is checked before any VM as for any spore. A miss, a damaged entry or a cache
that cannot be reached is one warning line, then the work is done locally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from sporevm import storeroots
from sporevm.build import initrd as initrd_mod
from sporevm.build import kernel as kernel_mod
from sporevm.build.progress import Reporter
from sporevm.dist.pack import pack
from sporevm.dist.pull import pull
from sporevm.dist.push import push
from sporevm.dist.transports import Sink, Source, open_sink, open_source
from sporevm.dist.uri import BundleURI, URIError, parse_uri
from sporevm.errors import SporeError, UsageError
from sporevm.pipeline import cache_entry
from sporevm.pipeline.cache_entry import FILES, FileRef, GuestEntry, Ref
from sporevm.spore import manifest
from sporevm.spore.chunks import ChunkStore
from sporevm.spore.sporedir import MANIFEST, write_spore
from sporevm.store import Store, blake3_file, sha256_file

MODES = ("min", "max")


@dataclass(frozen=True)
class CacheLocation:
    """One cache, parsed: where its objects and pointers live."""

    uri: BundleURI
    s3_endpoint: str | None = None

    def __str__(self) -> str:
        return self.uri.unpinned()

    def at(self, name: str) -> BundleURI:
        """The location of a pointer (``step-<key>``) or an object (``objects/<hex>``)."""
        u = self.uri
        if u.scheme == "oci":
            if name.startswith("objects/"):
                return u  # pushed by digest into the repository itself
            return dataclasses.replace(u, tag=name)
        if u.scheme == "s3":
            return dataclasses.replace(u, prefix=f"{u.prefix}/{name}" if u.prefix else name)
        return dataclasses.replace(u, path=f"{u.path.rstrip('/')}/{name}")

    def object_source(self, ref: Ref) -> Source:
        hexd = ref.digest.removeprefix("sha256:")
        if self.uri.scheme == "oci":
            uri = dataclasses.replace(self.uri, pin=ref.pin)
        else:
            uri = self.at(f"objects/{hexd}").with_pin(ref.pin)
        source = open_source(uri, s3_endpoint=self.s3_endpoint)
        source.pinned_bundle_digest = ref.digest
        return source


def parse_cache_uri(text: str, *, for_push: bool, s3_endpoint: str | None = None) -> CacheLocation:
    """A cache URI: a push/pull URI's grammar, with no pin and no oci tag (the cache
    names its own tags); http(s) only to read from."""
    where = "--cache-to" if for_push else "--cache-from"
    try:
        uri = parse_uri(text)
    except URIError as exc:
        raise UsageError(f"{where} {text[:200]}: {exc}") from None
    if uri.pin is not None:
        raise UsageError(f"{where} {text[:200]}: a cache URI carries no @sha256 pin")
    if uri.scheme == "oci" and uri.tag is not None:
        raise UsageError(
            f"{where} {text[:200]}: name the repository only (oci://host/repo); "
            "the cache tags its entries itself"
        )
    if for_push and uri.scheme in ("http", "https"):
        raise UsageError(
            f"{where} {text[:200]}: http(s) caches are read-only; write to file://, oci:// or s3://"
        )
    return CacheLocation(uri, s3_endpoint)


def _entry_key(*parts: str) -> str:
    return blake3.blake3("\0".join(("spore/cache-key/v1", *parts)).encode()).hexdigest()


class RemoteCaches:
    """The caches of one build: read in order (first hit wins), written to all."""

    def __init__(
        self,
        store: Store,
        reporter: Reporter,
        sources: Sequence[CacheLocation],
        sinks: Sequence[CacheLocation],
        mode: str,
    ) -> None:
        if mode not in MODES:
            raise UsageError(f"cache mode {mode!r}: use min or max")
        self.store, self.reporter = store, reporter
        self.sources, self.sinks, self.mode = list(sources), list(sinks), mode
        self.bytes_received = 0
        self.bytes_sent = 0
        self._unreachable: set[str] = set()  # caches that failed once: not asked again

    # -- the guest platform ----------------------------------------------------------
    def _guest_keys(self) -> tuple[kernel_mod.HostClass, str, str, str]:
        hc = kernel_mod.detect_host_class()
        kkey = kernel_mod.cache_key(kernel_mod.build_inputs(hc, store=self.store))
        akey = initrd_mod.build_key(self.store)
        return hc, kkey, akey, "guest-" + _entry_key("guest", hc, kkey, akey)

    def restore_guest(self) -> bool:
        hc, kkey, akey, name = self._guest_keys()
        for loc in self.sources:
            ref = self._read_ref(loc, name, "guest")
            if ref is None:
                continue
            try:
                self._install_guest(loc, ref, hc, kkey, akey)
            except (SporeError, OSError) as exc:
                self.reporter.warn(f"cache {loc}: guest entry not used: {_line(exc)}")
                continue
            self.reporter.info(f"guest   kernel and initramfs for {hc} from cache {loc}")
            return True
        return False

    def _install_guest(self, loc: CacheLocation, ref: Ref, hc: str, kkey: str, akey: str) -> None:
        source = loc.object_source(ref)
        data = source.read_small(cache_entry.NAME, cache_entry.MAX_ENTRY)
        if cache_entry.digest(data) != ref.digest:
            raise cache_entry.CacheEntryError(f"{loc}: guest entry does not match its pointer")
        entry = cache_entry.decode(data, f"{loc}: guest.json")
        if (entry.host_class, entry.kernel_key, entry.agent_key) != (hc, kkey, akey):
            raise cache_entry.CacheEntryError(f"{loc}: guest entry is for other inputs")
        with self.store.staging_dir("cache-guest") as stage:
            kdir = stage / "kernel"
            kdir.mkdir()
            paths = {
                n: (kdir / n if n in ("bzImage", "vmlinux", "config") else stage / n) for n in FILES
            }
            for name in FILES:
                ref_file = entry.files[name]
                source.fetch(name, paths[name], ref_file.size, ref_file.sha256)
                want = entry.blake3_of(name)
                if want and blake3_file(paths[name])[0] != want:
                    raise cache_entry.CacheEntryError(f"{loc}: {name} does not match its BLAKE3")
            # what was fetched (a file:// source copies without counting)
            self.bytes_received += len(data) + sum(f.size for f in entry.files.values())
            kernel_mod.install_kernel(self.store, hc, kkey, kdir, str(loc))
            initrd_mod.install_guest(self.store, akey, paths["agent"], paths["initrd"])

    def publish_guest(self) -> None:
        hc, kkey, akey, name = self._guest_keys()
        art = kernel_mod.cached_kernel(self.store, kkey, hc)
        agent = initrd_mod.cached_artifact(self.store, "guest-agent", akey, "agent")
        if art is None or agent is None:
            return  # a custom kernel (machine.kernel) or nothing built: nothing to share
        initrd = initrd_mod.cached_artifact(
            self.store, "initrd", initrd_mod.initrd_key(agent[0]), "initrd"
        )
        if initrd is None:
            return
        todo = [loc for loc in self.sinks if not self._has_ref(loc, name)]
        if not todo:  # before hashing ~20 MiB of kernel for nothing
            self.reporter.info("cache   guest entry already in every --cache-to")
            return
        paths = {
            "bzImage": art.path,
            "vmlinux": art.vmlinux_path,
            "config": art.config_path,
            "agent": agent[1],
            "initrd": initrd[1],
        }
        files = {n: FileRef(p.stat().st_size, _sha256_hex(p)) for n, p in paths.items()}
        entry = GuestEntry(
            hc, kkey, akey, art.digest, art.vmlinux_digest, agent[0], initrd[0], files
        )
        data = entry.encode()
        digest = cache_entry.digest(data)

        def put(sink: Sink) -> None:
            _put_guest(sink, paths, files, data)
            self.bytes_sent += sum(f.size for f in files.values()) + len(data)

        for loc in todo:
            self._publish(loc, name, "guest", digest, None, put)

    # -- step snapshots ----------------------------------------------------------------
    def restore_steps(self, keys: list[str], have: int) -> int:
        for n in range(len(keys) - 1, have, -1):
            for loc in self.sources:
                ref = self._read_ref(loc, f"step-{keys[n]}", "bundle")
                if ref is None:
                    continue
                try:
                    mid = self._install_step(loc, ref, keys[n])
                except (SporeError, OSError) as exc:
                    self.reporter.warn(f"cache {loc}: step snapshot not used: {_line(exc)}")
                    continue
                self.reporter.info(
                    f"cache   snapshot after {n} step(s) ({mid[:19]}…) from cache {loc}"
                )
                return n
        return have

    def _install_step(self, loc: CacheLocation, ref: Ref, key: str) -> str:
        source = loc.object_source(ref)
        with self.store.staging_dir("cache-step") as stage:
            out = stage / "spore"
            res = pull(source, self.store, out, child=ref.manifest, require_pin=True)
            self.bytes_received += res.bytes_received
            data = (out / MANIFEST).read_bytes()  # pull checked it against its id
            # pull made out a spore directory and a root for it; only the store's step
            # record keeps these chunks from now on.
            storeroots.discard(self.store.root, storeroots.root_for(out, res.manifest_id))
        m = manifest.decode(data, res.manifest_id)
        if manifest.manifest_id(data) != res.manifest_id:
            raise cache_entry.CacheEntryError(f"{loc}: manifest {res.manifest_id} changed")
        chunks = ChunkStore(self.store)
        chunks.put(data)  # as a build's own snapshot: its manifest is a chunk too
        if not m.provenance.steps or m.provenance.steps[-1] != key:
            raise cache_entry.CacheEntryError(
                f"{loc}: the snapshot stored for step key {key[:16]}… was taken after another step"
            )
        self.store.put_key("step", key, {"step": "", "manifest": res.manifest_id, "from": str(loc)})
        return res.manifest_id

    def publish_steps(self, keys: list[str], wanted: Sequence[int]) -> None:
        """Pack the snapshots after steps ``wanted`` (indexes into keys) into one bundle
        (shared chunks stored once), store it, and point each step key at its spore."""
        if not self.sinks:
            return
        chunks = ChunkStore(self.store)
        snaps: dict[int, tuple[str, manifest.Manifest]] = {}
        for n in sorted(set(wanted)):
            rec = self.store.get_key("step", keys[n])
            mid = rec.get("manifest") if rec else None
            if isinstance(mid, str):
                with contextlib.suppress(SporeError):
                    snaps[n] = (mid, manifest.decode(chunks.get(mid), mid))
        if not snaps:
            return
        todo = [
            loc
            for loc in self.sinks
            if not all(self._has_ref(loc, f"step-{keys[n]}") for n in snaps)
        ]
        if not todo:
            self.reporter.info(f"cache   {len(snaps)} step snapshot(s) already in every --cache-to")
            return
        last = max(snaps)
        with self.store.staging_dir("cache-pack") as stage:
            parent = stage / "parent"
            write_spore(snaps[last][1], parent)
            kids = stage / "children"
            kids.mkdir()
            seen = {snaps[last][0]}
            for n, (mid, m) in snaps.items():
                if mid not in seen:
                    write_spore(m, kids / f"step-{n:04d}")
                    seen.add(mid)
            children = kids if any(kids.iterdir()) else None
            res = pack(str(parent), children, stage / "bundle", self.store)
            for loc in todo:

                def write(sink_loc: CacheLocation = loc) -> str:
                    uri = sink_loc.at(f"objects/{res.digest.removeprefix('sha256:')}")
                    pushed = push(
                        stage / "bundle", open_sink(uri, s3_endpoint=sink_loc.s3_endpoint)
                    )
                    self.bytes_sent += pushed.bytes
                    return pushed.reference

                pin = self._store_object(loc, res.digest, write)
                if pin is None:
                    continue
                for n, (mid, _) in snaps.items():
                    ref = Ref("bundle", res.digest, pin, mid)
                    self._write_ref(loc, f"step-{keys[n]}", ref)
                self.reporter.info(
                    f"cache   {len(snaps)} step snapshot(s) to {loc} (bundle {res.digest[:19]}…)"
                )

    # -- pointers and objects ----------------------------------------------------------
    def _read_ref(self, loc: CacheLocation, name: str, kind: str) -> Ref | None:
        if str(loc) in self._unreachable:
            return None
        try:
            source = open_source(loc.at(name), s3_endpoint=loc.s3_endpoint, mutable=True)
            data = source.read_small(cache_entry.REF_NAME, cache_entry.MAX_REF)
            self.bytes_received += len(data)
        except (SporeError, OSError) as exc:
            if not _absent(exc):
                # Down, refusing or misconfigured: one warning, and no further waits on it.
                self._unreachable.add(str(loc))
                self.reporter.warn(
                    f"cache {loc}: {_line(exc)}; not using this cache for the rest of the build"
                )
            return None
        try:
            ref = cache_entry.decode_ref(data, f"{loc}: {name}")
            if ref.kind != kind:
                raise cache_entry.CacheEntryError(f"{loc}: {name} names a {ref.kind}, not a {kind}")
        except SporeError as exc:
            self.reporter.warn(_line(exc))
            return None
        if source.pinned_bundle_digest not in (None, cache_entry.ref_digest(data)):
            self.reporter.warn(f"cache {loc}: {name} does not match its own digest; not used")
            return None
        return ref

    def _has_ref(self, loc: CacheLocation, name: str) -> bool:
        try:
            open_source(loc.at(name), s3_endpoint=loc.s3_endpoint, mutable=True).read_small(
                cache_entry.REF_NAME, cache_entry.MAX_REF
            )
        except (SporeError, OSError):
            return False
        return True

    def _write_ref(self, loc: CacheLocation, name: str, ref: Ref) -> None:
        data = ref.encode()
        try:
            sink = open_sink(loc.at(name), s3_endpoint=loc.s3_endpoint)
            with self.store.staging_dir("cache-ref") as stage:
                path = stage / cache_entry.REF_NAME
                path.write_bytes(data)
                try:
                    sink.put(
                        cache_entry.REF_NAME,
                        path,
                        len(data),
                        "sha256:" + hashlib.sha256(data).hexdigest(),
                    )
                    sink.finish(cache_entry.ref_digest(data), [cache_entry.REF_NAME])
                except BaseException:
                    sink.abort()
                    raise
        except (SporeError, OSError) as exc:
            if "already exists" in str(exc):
                return  # another runner pointed this key first: its object is as good
            self.reporter.warn(f"cache {loc}: {name} not written: {_line(exc)}")

    def _store_object(
        self, loc: CacheLocation, digest: str, write: Callable[[], str]
    ) -> str | None:
        """Store an object (unless it is there) and return its pin; None after a warning."""
        try:
            reference = write()
        except (SporeError, OSError) as exc:
            self.reporter.warn(f"cache {loc}: not written: {_line(exc)}")
            return None
        pin = reference.rpartition("@")[2]
        return pin if pin.startswith("sha256:") else digest

    def _publish(
        self,
        loc: CacheLocation,
        name: str,
        kind: str,
        digest: str,
        mid: str | None,
        put: Callable[[Sink], None],
    ) -> None:
        def write() -> str:
            sink = open_sink(
                loc.at(f"objects/{digest.removeprefix('sha256:')}"), s3_endpoint=loc.s3_endpoint
            )
            try:
                put(sink)
                return sink.finish(digest, [cache_entry.NAME])
            except BaseException:
                sink.abort()
                raise

        pin = self._store_object(loc, digest, write)
        if pin is not None:
            self._write_ref(loc, name, Ref(kind, digest, pin, mid))
            self.reporter.info(f"cache   {kind} entry to {loc}")


def _put_guest(sink: Sink, paths: dict[str, Path], files: dict[str, FileRef], data: bytes) -> None:
    for name in FILES:
        sink.put(name, paths[name], files[name].size, "sha256:" + files[name].sha256)
    with tempfile.TemporaryDirectory(prefix="spore-cache-") as d:
        meta = Path(d) / cache_entry.NAME
        meta.write_bytes(data)
        sink.put(cache_entry.NAME, meta, len(data), "sha256:" + hashlib.sha256(data).hexdigest())


def _sha256_hex(path: Path) -> str:
    return sha256_file(path)[0].removeprefix("sha256:")


def _absent(exc: BaseException) -> bool:
    """A pointer that is not there (a miss), as each transport says it."""
    text = str(exc)
    return any(
        s in text
        for s in (
            "No such file",
            "not found",
            "Not Found",
            "NoSuchKey",
            "404",
            "does not exist",
            "MANIFEST_UNKNOWN",
        )
    )


def _line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
