"""`spore cache verify`: re-hash every store entry and check every record's references.

The publish protocol (docs/publish-protocol.md) promises that whatever a crash
interrupts, every name outside ``tmp/`` is complete and names exactly its
bytes, and a cache-key record only exists once everything it names does. This
module checks both promises, read-only, on a whole store; the crash-safety
harness runs it after every kill.

Problems come in kinds:

- ``corrupt``: an entry's bytes do not match its name (or its record);
- ``temp``: a staging name (``.tmp-*``) outside ``tmp/``;
- ``malformed``: a name or record that spore never writes;
- ``dangling``: a record names an entry that is absent. A crash never leaves
  one; prune by last use can (the record is then a cache miss), so
  ``spore cache verify`` reports these without failing;
- ``stale``: a record in an older format that lacks a field (also a miss), or a
  root whose spore directory is gone or holds another spore (prune drops it);
- ``broken``: a live root (its spore directory still exists) names an object the
  store lacks: that spore will not restore. Prune never causes one;
- ``blocked``: a root that cannot be judged (its directory cannot be read, or its
  manifest not decoded): prune removes nothing while it is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from sporevm.errors import SporeError
from sporevm.store import Store

_HEX = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z0-9-]+")
_READ = 1 << 20
_KERNEL_FILES = frozenset({"bzImage", "vmlinux", "config"})
# Top-level names the store itself writes; anything else is reported, not judged.
_KNOWN_TOP = frozenset(
    {
        "blobs",
        "rootfs",
        "chunks",
        "guest",
        "kernels",
        "memfiles",
        "keys",
        "roots",
        "state",
        "tmp",
        "lock",
    }
)


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt | temp | malformed | dangling | stale | broken | blocked
    path: str  # relative to the store root
    message: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "message": self.message}


@dataclass
class Report:
    root: Path
    checked: dict[str, int] = field(default_factory=dict)  # area -> entries verified
    problems: list[Problem] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # top-level names spore does not own

    def fatal(self) -> list[Problem]:
        """Problems a crash or a bug can cause; dangling and stale records are cache misses."""
        return [p for p in self.problems if p.kind not in ("dangling", "stale")]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "checked": self.checked,
            "problems": [p.to_json() for p in self.problems],
            "unknown": self.unknown,
            "ok": not self.fatal(),
        }


def _hash(path: Path, algo: str) -> str:
    h: Any = hashlib.sha256() if algo == "sha256" else blake3.blake3()
    with open(path, "rb") as fh:
        while block := fh.read(_READ):
            h.update(block)
    return str(h.hexdigest())


class _Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.report = Report(root)
        self.manifests: dict[str, Any] = {}  # manifest id -> decoded manifest (memfile checks)

    def problem(self, kind: str, path: Path, message: str) -> None:
        self.report.problems.append(Problem(kind, str(path.relative_to(self.root)), message))

    def count(self, area: str) -> None:
        self.report.checked[area] = self.report.checked.get(area, 0) + 1

    def regular(self, path: Path) -> bool:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            self.problem("malformed", path, "not a regular file")
            return False
        return True

    def names(self, base: Path) -> list[Path]:
        """Entries of one content-addressed directory; temp and junk names are reported."""
        if not base.exists():
            return []
        out = []
        for p in sorted(base.iterdir()):
            if p.name.startswith(".tmp-"):
                self.problem("temp", p, "staging name outside tmp/ (a crash leftover)")
            elif not _HEX.fullmatch(p.name):
                self.problem("malformed", p, "not named by a 64-hex digest")
            else:
                out.append(p)
        return out

    # -- content-addressed areas ------------------------------------------
    def files(self, sub: str, algo: str, area: str, limit: int | None = None) -> None:
        for p in self.names(self.root / sub):
            if not self.regular(p):
                continue
            if limit is not None and p.lstat().st_size > limit:
                self.problem("corrupt", p, f"larger than {limit} bytes")
                continue
            got = _hash(p, algo)
            if got != p.name:
                self.problem("corrupt", p, f"content is {algo}:{got}")
            self.count(area)

    def kernels(self) -> None:
        for d in self.names(self.root / "kernels" / "blake3"):
            if not d.is_dir() or d.is_symlink():
                self.problem("malformed", d, "a kernel entry is a directory")
                continue
            names = {p.name for p in d.iterdir()}
            if names != _KERNEL_FILES:
                self.problem(
                    "corrupt", d, f"holds {sorted(names)}, expected {sorted(_KERNEL_FILES)}"
                )
                continue
            if not all(self.regular(d / n) for n in _KERNEL_FILES):
                continue
            if _hash(d / "bzImage", "blake3") != d.name:
                self.problem("corrupt", d / "bzImage", "does not hash to its directory's name")
            self.count("kernels")

    # -- records ------------------------------------------------------------
    def keys(self) -> None:
        base = self.root / "keys"
        if not base.is_dir():
            return
        for kdir in sorted(base.iterdir()):
            if not kdir.is_dir() or not _KIND.fullmatch(kdir.name):
                self.problem("malformed", kdir, "not a record kind directory")
                continue
            for p in sorted(kdir.iterdir()):
                stem, dot, ext = p.name.partition(".")
                if p.name.startswith(".tmp-"):
                    self.problem("temp", p, "staging name outside tmp/ (a crash leftover)")
                elif not _HEX.fullmatch(stem) or ext not in ("json", "lock") or not dot:
                    self.problem("malformed", p, "not <64 hex>.json or .lock")
                elif ext == "json" and self.regular(p):
                    self.record(kdir.name, p)

    def record(self, kind: str, path: Path) -> None:
        try:
            rec = json.loads(path.read_bytes())
        except ValueError:
            self.problem("corrupt", path, "not JSON (a torn write would look like this)")
            return
        if not isinstance(rec, dict):
            self.problem("corrupt", path, "not a JSON object")
            return
        self.count("keys")
        check: Callable[[Path, dict[str, Any]], None] | None = {
            "rootfs": self.rec_rootfs,
            "step": self.rec_manifest,
            "spore": self.rec_manifest,
            "kernel": self.rec_kernel,
            "guest-agent": self.rec_guest,
            "initrd": self.rec_guest,
        }.get(kind)
        if check is not None:
            check(path, rec)

    def need(self, path: Path, what: str, target: Path) -> bool:
        if target.exists():
            return True
        self.problem("dangling", path, f"names {what}, which is not in the store")
        return False

    def digest(self, path: Path, rec: dict[str, Any], name: str, algo: str = "blake3") -> str:
        value = rec.get(name)
        if value is None:
            self.problem("stale", path, f"has no {name!r} (an older record format: a miss)")
            return ""
        if (
            not isinstance(value, str)
            or not value.startswith(algo + ":")
            or not _HEX.fullmatch(value[len(algo) + 1 :])
        ):
            self.problem("corrupt", path, f"field {name!r} is not a {algo} digest")
            return ""
        return value[len(algo) + 1 :]

    def rec_rootfs(self, path: Path, rec: dict[str, Any]) -> None:
        hexd = self.digest(path, rec, "digest")
        target = self.root / "rootfs" / "blake3" / hexd
        if hexd and self.need(path, f"rootfs blake3:{hexd}", target):
            if target.lstat().st_size != rec.get("size"):
                self.problem("corrupt", path, f"size {rec.get('size')} differs from the entry's")

    def rec_kernel(self, path: Path, rec: dict[str, Any]) -> None:
        hexd = self.digest(path, rec, "digest")
        vhex = self.digest(path, rec, "vmlinux_digest")
        d = self.root / "kernels" / "blake3" / hexd
        if hexd and vhex and self.need(path, f"kernel blake3:{hexd}", d / "vmlinux"):
            if _hash(d / "vmlinux", "blake3") != vhex:
                self.problem("corrupt", d / "vmlinux", "does not match its record")

    def rec_guest(self, path: Path, rec: dict[str, Any]) -> None:
        for name in ("agent", "initrd"):
            if name in rec:
                hexd = self.digest(path, rec, name)
                if hexd:
                    self.need(path, f"{name} blake3:{hexd}", self.root / "guest" / "blake3" / hexd)

    def rec_manifest(self, path: Path, rec: dict[str, Any]) -> None:
        from sporevm.spore import manifest

        hexd = self.digest(path, rec, "manifest")
        target = self.root / "chunks" / "blake3" / hexd
        if not hexd or not self.need(path, f"manifest blake3:{hexd}", target):
            return
        try:
            with open(target, "rb") as fh:
                m = manifest.decode(fh.read(manifest.MAX_MANIFEST + 1), str(target))
        except (OSError, SporeError) as exc:
            self.problem("corrupt", path, f"names a manifest that does not decode: {exc}")
            return
        self.manifests["blake3:" + hexd] = m
        for cid in [c for c, _, _ in manifest.objects(m)]:
            if not self.need(
                path,
                f"chunk {cid} (via manifest blake3:{hexd})",
                self.root / "chunks" / "blake3" / cid.split(":", 1)[1],
            ):
                return  # one is enough to make the record a miss

    # -- roots: the spore directories prune keeps alive (sporevm/storeroots.py) ----
    def roots(self) -> None:
        from sporevm.spore import manifest
        from sporevm.storeroots import ROOTS, survey_store

        base = self.root / ROOTS
        if not base.is_dir():
            return
        for p in sorted(base.iterdir()):
            if p.name.startswith(".tmp-"):
                self.problem("temp", p, "staging name outside tmp/ (a crash leftover)")
        for stored, probe in survey_store(self.root):
            path, root = base / stored.name, stored.root
            if root is None or stored.error is not None or probe is None:
                self.problem(
                    "corrupt",
                    path,
                    f"not a valid root record ({stored.error}); "
                    "prune removes nothing until it is deleted",
                )
                continue
            self.count("roots")
            if probe.state in ("gone", "replaced"):
                self.problem(
                    "stale",
                    path,
                    f"root {root.path}: {probe.detail} (the next prune drops this record)",
                )
                continue
            try:
                if probe.state != "live":
                    raise SporeError(probe.detail)
                m = manifest.decode(probe.manifest or b"", f"{root.path}/manifest.json")
            except SporeError as exc:
                self.problem(
                    "blocked",
                    path,
                    f"root {root.path} cannot be judged ({exc}); "
                    "prune removes nothing while it is there",
                )
                continue
            self.manifests[root.manifest] = m
            needed = [c for c, _, _ in manifest.objects(m)]
            missing = [
                f"chunk {c}"
                for c in sorted(set(needed))
                if not (self.root / "chunks" / "blake3" / c.split(":", 1)[1]).exists()
            ]
            if not (self.root / "rootfs" / "blake3" / m.rootfs.digest.split(":", 1)[1]).exists():
                missing.append(f"rootfs {m.rootfs.digest}")
            if missing:
                self.problem(
                    "broken",
                    path,
                    f"live spore {root.path} needs {missing[0]}"
                    + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                    + ", not in the store: it will not restore (pull or rebuild it)",
                )

    # -- memfiles (checked against the indexes of manifests seen above) ----
    def memfiles(self) -> None:
        from sporevm.spore.backing import index_id
        from sporevm.spore.chunks import CHUNK

        indexes = {index_id(m.memory): m.memory for m in self.manifests.values()}
        for p in self.names(self.root / "memfiles" / "blake3"):
            if not self.regular(p):
                continue
            index = indexes.get(p.name)
            if index is None:
                self.count("memfiles-unreferenced")  # its index is in no recorded manifest
                continue
            if p.lstat().st_size != index.memory_size:
                self.problem("corrupt", p, f"is not {index.memory_size} bytes")
                continue
            with open(p, "rb") as fh:
                for c, cid in enumerate(index.chunks):
                    data = os.pread(fh.fileno(), CHUNK, c * CHUNK)
                    ok = (
                        data.count(0) == len(data)
                        if cid is None
                        else "blake3:" + blake3.blake3(data).hexdigest() == cid
                    )
                    if not ok:
                        self.problem("corrupt", p, f"chunk {c} does not match the index")
                        break
            self.count("memfiles")

    def state(self) -> None:
        base = self.root / "state"
        if not base.is_dir():
            return
        for p in sorted(base.iterdir()):
            if p.name.startswith(".tmp-"):
                self.problem("temp", p, "staging name outside tmp/ (a crash leftover)")
            elif p.name.endswith(".doit.json") and self.regular(p):
                try:
                    json.loads(p.read_bytes())
                except ValueError:
                    self.problem("corrupt", p, "doit task history is not JSON (torn write)")

    def run(self) -> Report:
        self.files("blobs/sha256", "sha256", "blobs")
        self.files("rootfs/blake3", "blake3", "rootfs")
        self.files("guest/blake3", "blake3", "guest")
        self.files("chunks/blake3", "blake3", "chunks", limit=16 << 20)
        self.kernels()
        self.keys()
        self.roots()
        self.memfiles()
        self.state()
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".tmp-"):
                self.problem("temp", p, "staging name outside tmp/ (a crash leftover)")
            elif p.name not in _KNOWN_TOP:
                self.report.unknown.append(p.name)
        return self.report


def verify_store(store: Store) -> Report:
    """Check the whole store (read-only); the caller decides what to hold the lock for."""
    return _Checker(store.root).run()
