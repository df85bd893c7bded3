"""What `spore cache prune` may remove: everything no live spore and no kept record reaches.

The store is a graph. Its roots are the spore directories that still exist
(``roots/``, sporevm/storeroots.py) and every entry used more recently than
``--older-than`` (a young record or entry is kept, and keeps what it names).
From a manifest prune reaches its memory chunks and state objects, its own
manifest chunk, its rootfs, the kernel and initramfs its platform contract
names, the memfile built for its memory index and the step records its
provenance lists. A record is reached when something it leads to is (a rootfs
record by its rootfs, a kernel record by its kernel, a step, spore or bundle
record by its manifest) and then reaches everything it names, so a kept record never
dangles. A rootfs record reaches the OCI blobs of the image the rootfs was
built from (manifest, config, layers, and any index listing that manifest):
rebuilding a live spore's Sporefile needs no registry. Everything else goes.

Safety rests only on the roots and the manifests in the spore directories: a
root that cannot be judged (a malformed record, a directory that cannot be
read, a manifest this version cannot decode) stops the prune before anything
is removed. Records and blobs read here are the store's own; one that does not
parse reaches nothing, which can only make prune remove what no live spore
needs (docs/store.md, "Prune").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from sporevm.errors import SporeError, StoreError
from sporevm.nofollow import open_file
from sporevm.store import BLAKE3_DIGEST, KEY, SHA256_DIGEST, Entry, Store
from sporevm.storeroots import ROOTS, Probe, Root, survey

_MAX_RECORD = 1 << 20  # build-key records are a few KiB
MANIFEST_TOKEN = "manifest:"  # + manifest id: reaching it reads and expands the manifest
VMLINUX_TOKEN = "vmlinux:"  # + digest: the kernel directory whose vmlinux hashes to it


@dataclass(frozen=True)
class JudgedRoot:
    name: str  # the record's file name in roots/
    root: Root
    probe: Probe


@dataclass
class Plan:
    """What one prune removes, in order: dead root records, records, then entries."""

    dead_roots: list[JudgedRoot] = field(default_factory=list)
    live_roots: list[Root] = field(default_factory=list)
    remove: list[Entry] = field(default_factory=list)
    kept: int = 0


class UnjudgedRoot(StoreError):
    """A root record or its directory cannot be judged: prune removes nothing."""


def judge_roots(root_fd: int, store_root: Path) -> list[JudgedRoot]:
    """Every record in ``roots/`` and what its directory holds now.

    Raises UnjudgedRoot on the first record that fails to parse or whose directory
    cannot be read: such a record keeps everything (never a live spore lost to a
    corrupt record), so prune stops with one line saying which file to look at."""
    out = []
    for stored, p in survey(root_fd):
        path = store_root / ROOTS / stored.name
        if stored.root is None or stored.error is not None or p is None:
            raise UnjudgedRoot(
                f"cache prune: {path} is not a valid root record ({stored.error}); nothing "
                "was removed — the spore it protected cannot be told, so run `spore cache "
                "roots`, delete that file, re-register live spores with `spore cache keep "
                "DIR`, and prune again"
            )
        if p.state == "unreadable":
            raise UnjudgedRoot(
                f"cache prune: cannot tell whether {stored.root.path} still holds spore "
                f"{stored.root.manifest} ({p.detail}); nothing was removed — fix or remove "
                f"that directory, or delete its record {path}, and prune again"
            )
        out.append(JudgedRoot(stored.name, stored.root, p))
    return out


def plan(store: Store, root_fd: int, entries: list[Entry], cutoff: float | None) -> Plan:
    """Decide, without removing anything, what a prune with ``cutoff`` (None: every
    unreachable entry; else entries last used before it) removes."""
    from sporevm.spore import manifest

    result = Plan()
    marker = _Marker(store.root, root_fd, entries)
    for judged in judge_roots(root_fd, store.root):
        root = judged.root
        if judged.probe.state != "live":
            result.dead_roots.append(judged)
            continue
        try:
            m = manifest.decode(judged.probe.manifest or b"", f"{root.path}/manifest.json")
        except SporeError as exc:
            raise UnjudgedRoot(
                f"cache prune: {exc}; nothing was removed — a spore this "
                "version cannot read may need anything in the store (prune "
                "with the spore version that wrote it)"
            ) from None
        marker.manifests[root.manifest] = m
        marker.reach(MANIFEST_TOKEN + root.manifest)
        result.live_roots.append(root)
    for e in entries:
        if cutoff is not None and e.last_used >= cutoff:
            marker.reach(marker.rel(e))
    marker.run()
    doomed = [e for e in entries if marker.rel(e) not in marker.reached]
    # Records before entries (a crash in between leaves entries without records, never
    # a record naming a removed entry); oldest first within each.
    result.remove = sorted(doomed, key=lambda e: (not e.kind.startswith("key/"), e.last_used))
    result.kept = len(entries) - len(doomed)
    return result


class _Marker:
    """Graph search over tokens: an entry's path relative to the store root, or
    ``manifest:<id>`` / ``vmlinux:<digest>``. ``refs`` are what reaching a token
    reaches; ``triggers`` the records (and OCI indexes) a reached token keeps."""

    def __init__(self, root: Path, root_fd: int, entries: list[Entry]) -> None:
        self.root, self.root_fd = root, root_fd
        self._cut = len(str(root)) + 1
        self.present = {self.rel(e): e for e in entries}
        self.reached: set[str] = set()
        self.todo: list[str] = []
        self.manifests: dict[str, Any] = {}  # manifest id -> decoded Manifest
        self.refs: dict[str, list[str]] = {}
        self.triggers: dict[str, list[str]] = {}
        self.vmlinux: dict[str, str | None] = {}  # kernel dir hex -> digest of its vmlinux
        self._oci: dict[str, Any] | None = None  # blob hex -> decoded manifest/index
        for rel, e in self.present.items():
            if e.kind.startswith("key/"):
                self._record(rel, e.kind[len("key/") :])

    def rel(self, e: Entry) -> str:
        return str(e.path)[self._cut :]  # entries() builds every path below the root

    def reach(self, token: str) -> None:
        if token not in self.reached:
            self.reached.add(token)
            self.todo.append(token)

    def run(self) -> None:
        while True:
            while self.todo:
                token = self.todo.pop()
                for t in self._refs(token):
                    self.reach(t)
                for t in self.triggers.get(token, ()):
                    self.reach(t)
            if not self._find_kernels():
                return

    # -- what a token reaches -----------------------------------------------------
    def _refs(self, token: str) -> Iterable[str]:
        if token in self.refs:
            return self.refs[token]
        if token.startswith(MANIFEST_TOKEN):
            return self._manifest_refs(token[len(MANIFEST_TOKEN) :])
        if token.startswith("blobs/sha256/") and token in self.present:
            return self._blob_refs(token)
        return ()

    def _manifest_refs(self, mid: str) -> list[str]:
        from sporevm.spore import manifest
        from sporevm.spore.backing import index_id

        m = self.manifests.get(mid) or self._manifest_from_chunks(mid)
        hexd = mid.removeprefix("blake3:")
        out = [f"chunks/blake3/{hexd}"]
        if m is None:
            return out
        objects = [cid for cid, _, _ in manifest.objects(m)]  # chunks, state, block table
        out += [f"chunks/blake3/{c.removeprefix('blake3:')}" for c in objects]
        p = m.platform
        out += [
            f"rootfs/blake3/{m.rootfs.digest.removeprefix('blake3:')}",
            f"kernels/blake3/{p.kernel.removeprefix('blake3:')}",
            VMLINUX_TOKEN + p.kernel,
            f"guest/blake3/{p.initrd.removeprefix('blake3:')}",
            f"memfiles/blake3/{index_id(m.memory)}",
        ]
        out += [f"keys/step/{k}.json" for k in m.provenance.steps]
        return out

    def _manifest_from_chunks(self, mid: str) -> Any:
        """A step snapshot's manifest from the chunk CAS; None if absent or not one."""
        from sporevm.spore import manifest

        hexd = mid.removeprefix("blake3:")
        if f"chunks/blake3/{hexd}" not in self.present:
            return None
        try:
            data = self._read("chunks/blake3", hexd, manifest.MAX_MANIFEST)
            if "blake3:" + blake3.blake3(data).hexdigest() != mid:
                return None
            return manifest.decode(data, mid)
        except (OSError, SporeError):
            return None

    # -- build-key records ------------------------------------------------------------
    def _record(self, rel: str, kind: str) -> None:
        """Index one record: what it names (refs) and what keeps it (triggers)."""
        try:
            rel_dir, name = rel.rsplit("/", 1)
            rec = json.loads(self._read(rel_dir, name, _MAX_RECORD))
        except (OSError, ValueError, RecursionError):
            return  # unreadable: kept by age only (verify reports it)
        if not isinstance(rec, dict):
            return
        refs: list[str] = []
        keeps: list[str] = []  # tokens that keep this record when reached

        def b3(name: str, area: str, *, primary: bool = True) -> None:
            v = rec.get(name)
            if isinstance(v, str) and BLAKE3_DIGEST.fullmatch(v):
                tok = f"{area}/{v.removeprefix('blake3:')}"
                refs.append(tok)
                if primary:
                    keeps.append(tok)

        if kind == "rootfs":
            b3("digest", "rootfs/blake3")
            b3("table", "chunks/blake3", primary=False)  # its block table, kept with it
            image = rec.get("image")
            if isinstance(image, str) and SHA256_DIGEST.fullmatch(image):
                refs.append(f"blobs/sha256/{image.removeprefix('sha256:')}")
        elif kind == "kernel":
            b3("digest", "kernels/blake3")
            v = rec.get("vmlinux_digest")
            if isinstance(v, str) and BLAKE3_DIGEST.fullmatch(v):
                keeps.append(VMLINUX_TOKEN + v)
        elif kind == "guest-agent":
            b3("agent", "guest/blake3")
        elif kind == "initrd":
            b3("initrd", "guest/blake3")
            b3("agent", "guest/blake3", primary=False)
        elif kind in ("step", "spore", "bundle"):  # bundle: a memo kept with its spore
            mid = rec.get("manifest")
            if isinstance(mid, str) and BLAKE3_DIGEST.fullmatch(mid):
                if kind != "bundle":
                    refs.append(MANIFEST_TOKEN + mid)
                keeps.append(f"chunks/blake3/{mid.removeprefix('blake3:')}")
            steps = rec.get("steps")  # spore records: the whole chain the build ran
            if kind == "spore" and isinstance(steps, list):
                refs += [
                    f"keys/step/{k}.json" for k in steps if isinstance(k, str) and KEY.fullmatch(k)
                ]
        self.refs[rel] = refs
        for tok in keeps:
            self.triggers.setdefault(tok, []).append(rel)

    # -- OCI blobs ----------------------------------------------------------------------
    def _blob_refs(self, token: str) -> list[str]:
        """A manifest reaches its config and layers (and keeps every index listing it);
        an index reaches its manifests."""
        from sporevm.build.ocimanifest import ImageIndex

        docs = self._oci_docs()
        doc = docs.get(token.rsplit("/", 1)[1])
        if doc is None:
            return []
        if isinstance(doc, ImageIndex):
            return [f"blobs/sha256/{d.digest.removeprefix('sha256:')}" for d in doc.manifests]
        return [
            f"blobs/sha256/{d.digest.removeprefix('sha256:')}" for d in (doc.config, *doc.layers)
        ]

    def _oci_docs(self) -> dict[str, Any]:
        """Every manifest and index blob, decoded once (only when a blob is reached)."""
        from sporevm.build.ocimanifest import MAX_DOC_SIZE, ImageIndex, decode_manifest_or_index

        if self._oci is not None:
            return self._oci
        self._oci = {}
        for rel, e in self.present.items():
            if e.kind != "blob" or e.size > MAX_DOC_SIZE:
                continue
            hexd = rel.rsplit("/", 1)[1]
            try:
                data = self._read("blobs/sha256", hexd, MAX_DOC_SIZE)
                if not data.lstrip()[:1] == b"{" or hashlib.sha256(data).hexdigest() != hexd:
                    continue  # a layer, or corrupt (verify reports it)
                doc = decode_manifest_or_index(data, what=f"blob sha256:{hexd}")
            except (OSError, SporeError, ValueError, RecursionError):
                continue  # configs and anything else: not manifests
            self._oci[hexd] = doc
            if isinstance(doc, ImageIndex):
                for d in doc.manifests:
                    listed = f"blobs/sha256/{d.digest.removeprefix('sha256:')}"
                    self.triggers.setdefault(listed, []).append(rel)
        # Blobs reached before the index map existed: their indexes now follow.
        for tok in list(self.reached):
            for t in self.triggers.get(tok, ()):
                if t.startswith("blobs/"):
                    self.reach(t)
        return self._oci

    # -- kernels named by their vmlinux -------------------------------------------------
    def _find_kernels(self) -> bool:
        """Keep the kernel directory whose vmlinux a reached manifest names (on kvm-pvm
        the platform contract names the vmlinux, the directory its bzImage), checked by
        hashing, so neither a missing nor a wrong kernel record can lose it. True if
        something new was reached."""
        wanted = {
            t[len(VMLINUX_TOKEN) :]
            for t in self.reached
            if t.startswith(VMLINUX_TOKEN)
            and f"kernels/blake3/{t.rsplit(':', 1)[1]}" not in self.present
        }
        dirs = [rel for rel, e in self.present.items() if e.kind == "kernel"]
        have = {self._vmlinux(rel) for rel in dirs if rel in self.reached}
        grew = False
        for rel in dirs:
            if not wanted - have:
                break
            if rel not in self.reached and self._vmlinux(rel) in wanted - have:
                have.add(self._vmlinux(rel))
                self.reach(rel)
                grew = True
        return grew

    def _vmlinux(self, rel: str) -> str | None:
        hexd = rel.rsplit("/", 1)[1]
        if hexd not in self.vmlinux:
            self.vmlinux[hexd] = _hash_at(self.root_fd, rel, "vmlinux")
        return self.vmlinux[hexd]

    # -- reading through descriptors ------------------------------------------------------
    def _read(self, rel_dir: str, name: str, limit: int) -> bytes:
        fd = open_file(self.root_fd, f"{rel_dir}/{name}")  # regular files only, no links
        try:
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise OSError(f"{rel_dir}/{name}: larger than {limit} bytes")
        return data


def _hash_at(root_fd: int, rel_dir: str, name: str) -> str | None:
    """BLAKE3 of a regular file below the root, never following a link; None if absent."""
    try:
        fd = open_file(root_fd, f"{rel_dir}/{name}")
    except OSError:
        return None
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        while block := os.read(fd, 1 << 20):
            h.update(block)
    finally:
        os.close(fd)
    return "blake3:" + h.hexdigest()
