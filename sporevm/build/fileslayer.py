"""The Sporefile's ``files:`` as one deterministic tar layer on top of the image.

The layer is applied by the same path-safe applier as the image layers
(layers.py), so a base image cannot redirect a copied file through a symlink,
and its sha256 goes into the rootfs key: editing, renaming or re-moding a copied
file rebuilds the rootfs (and so boot and steps); nothing else changes any key.

Sources are read through the shared no-follow walker (``nofollow.py``:
directory fds reached from the build context, O_NOFOLLOW on every component),
so a path the Sporefile loader validated cannot be swapped for a link to
somewhere else afterwards. A symlink, FIFO, socket or device inside a copied
directory is an error: copying a link would copy host meaning into the guest,
following it could leave the context. See docs/sporefile.md (``files``) and docs/rootfs.md.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from sporevm import nofollow
from sporevm.build.rootfs import ROOTFS_EPOCH
from sporevm.errors import LayerError, SporefileError
from sporevm.sporefile import FileSpec
from sporevm.sporefile_yaml import show

MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
MAX_ENTRIES = 1_000_000  # the applier's per-image bound; checked before reading contents
MAX_DEPTH = 256  # the applier's max_depth
_BUF = 1 << 20

Kind = Literal["file", "dir"]
Comps = tuple[str, ...]


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass(frozen=True)
class _Entry:
    kind: Kind
    mode: int
    src: Comps  # below the build context, never through a symlink
    index: int  # files[index] put it here (the last one, when several did)


class FilesLayer:
    """``files:`` of one Sporefile: plan, tar bytes, digest, and errors named by field."""

    def __init__(
        self,
        specs: tuple[FileSpec, ...],
        context: Path,
        sporefile: Path,
        outputs: tuple[Path, ...] = (),
    ) -> None:
        self.specs = specs
        self.context = context
        self.sporefile = sporefile
        self.outputs = outputs  # the build's own products: copying them would never converge
        self._digest: str | None = None
        self._plan: dict[Comps, _Entry] | None = None

    def fail(self, index: int, key: str, msg: str) -> SporefileError:
        return SporefileError(f"{self.sporefile}: files[{index}].{key}: {msg}")

    # -- planning: what lands where ---------------------------------------------------
    def check(self) -> None:
        """Fail before any work; the plan itself is made when the key is (after locking)."""
        self.plan()
        self._plan = None

    def plan(self) -> dict[Comps, _Entry]:
        """Guest path components -> entry. Later files[] entries win, as successive copies."""
        if self._plan is not None:
            return self._plan
        entries: dict[Comps, _Entry] = {}
        below: dict[Comps, int] = {}  # paths used as a parent -> the files[] index using it
        for i, spec in enumerate(self.specs):
            for out in self.outputs:
                if out.is_relative_to(spec.src):
                    raise self.fail(
                        i,
                        "src",
                        f"{show(spec.src_rel)} contains the build output "
                        f"{show(str(out.relative_to(self.context)))}; copy a "
                        "subdirectory instead, or move output: elsewhere",
                    )
            try:
                walked = self._walk(i, spec)
            except OSError as exc:  # e.g. an unreadable directory in the context
                raise self.fail(
                    i,
                    "src",
                    f"{show(spec.src_rel)}: {exc.strerror or exc}; "
                    "every copied file must be readable",
                ) from None
            for comps, entry in walked:
                self._place(entries, below, comps, entry)
                if len(entries) > MAX_ENTRIES:
                    raise self.fail(i, "src", f"more than {MAX_ENTRIES} entries to copy")
        self._plan = entries
        return entries

    def _place(
        self, entries: dict[Comps, _Entry], below: dict[Comps, int], comps: Comps, entry: _Entry
    ) -> None:
        where = show("/" + "/".join(comps))
        old = entries.get(comps)
        if old is not None and old.kind != entry.kind:
            raise self.fail(
                entry.index,
                "dst",
                f"{where} is a {entry.kind} here but "
                f"files[{old.index}] puts a {old.kind} there; copy them to "
                "different paths",
            )
        if entry.kind == "file" and comps in below:
            raise self.fail(
                entry.index,
                "dst",
                f"{where} is a file here but files"
                f"[{below[comps]}] puts entries below it; copy them to "
                "different paths",
            )
        for n in range(len(comps)):
            parent = entries.get(comps[:n])
            if parent is not None and parent.kind == "file":
                raise self.fail(
                    entry.index,
                    "dst",
                    f"{where} needs a directory where files"
                    f"[{parent.index}] puts a file; copy them to different paths",
                )
            below.setdefault(comps[:n], entry.index)
        entries[comps] = entry

    def _walk(self, i: int, spec: FileSpec) -> list[tuple[Comps, _Entry]]:
        dst = PurePosixPath(spec.dst)
        base: Comps = dst.parts[1:]
        try:
            rel = spec.src.relative_to(self.context)
        except ValueError:
            raise self.fail(
                i, "src", f"{show(spec.src_rel)} is outside the build context {self.context}"
            ) from None
        src: Comps = rel.parts
        for part in (*base, *src):
            _check_utf8(self, i, part)
        fd = self._open(i, spec, src, directory=spec.src.is_dir())
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                if not base:
                    raise self.fail(
                        i, "dst", "/ is the root directory; a file needs a path such as /NAME"
                    )
                if spec.dst.endswith("/"):
                    raise self.fail(
                        i,
                        "dst",
                        f"{show(spec.dst)} ends with '/' but src is a "
                        f"file; write the file's full path, e.g. {spec.dst}"
                        f"{PurePosixPath(spec.src_rel).name}",
                    )
                return [(base, _Entry("file", self._mode(spec, st), src, i))]
            if not stat.S_ISDIR(st.st_mode):
                raise self.fail(
                    i,
                    "src",
                    f"{show(spec.src_rel)} is neither a regular file nor "
                    "a directory; only files and directories can be copied",
                )
            out = [(base, _Entry("dir", self._mode(spec, st), src, i))]
            self._walk_dir(i, spec, fd, base, src, out)
            return out
        finally:
            os.close(fd)

    def _walk_dir(
        self,
        i: int,
        spec: FileSpec,
        fd: int,
        dst: Comps,
        src: Comps,
        out: list[tuple[Comps, _Entry]],
    ) -> None:
        if len(dst) >= MAX_DEPTH:
            raise self._too_deep(i, src)
        for entry in nofollow.walk(fd):
            _check_utf8(self, i, entry.name)
            shown = show("/".join((*src, *entry.path)))
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise self.fail(
                    i,
                    "src",
                    f"{shown} is a symlink; symlinks are not copied "
                    "(copy its target with its own files entry, or create the "
                    "link in a step)",
                )
            if stat.S_ISREG(st.st_mode):
                kind: Kind = "file"
            elif stat.S_ISDIR(st.st_mode):
                kind = "dir"
                if len(dst) + len(entry.path) >= MAX_DEPTH:  # before the walk enters it
                    raise self._too_deep(i, (*src, *entry.path))
            else:
                raise self.fail(
                    i,
                    "src",
                    f"{shown} is neither a regular file nor a directory; "
                    "only files and directories can be copied",
                )
            out.append(
                ((*dst, *entry.path), _Entry(kind, self._mode(spec, st), (*src, *entry.path), i))
            )

    def _too_deep(self, i: int, src: Comps) -> SporefileError:
        return self.fail(
            i,
            "src",
            f"{show('/'.join(src))} is nested more than {MAX_DEPTH} levels deep in the guest",
        )

    @staticmethod
    def _mode(spec: FileSpec, st: os.stat_result) -> int:
        # setuid/setgid/sticky only when asked for: the copy is owned by root.
        return spec.mode if spec.mode is not None else stat.S_IMODE(st.st_mode) & 0o777

    def _open(self, i: int, spec: FileSpec, src: Comps, *, directory: bool) -> int:
        """An fd for context/src reached without following a symlink at any component."""
        try:
            root = nofollow.open_root(self.context, follow=False)
        except OSError as exc:
            raise self.fail(
                i, "src", f"cannot open the build context {self.context}: {exc.strerror}"
            ) from None
        try:
            if directory:
                return nofollow.open_dir(root, src)
            return nofollow.open_file(root, src, regular=False)
        except OSError as exc:
            rel = getattr(exc, "rel", "/".join(src))
            reason = (
                "it is a symlink" if getattr(exc, "symlink", False) else os.strerror(exc.errno or 0)
            )
            raise self.fail(
                i,
                "src",
                f"{show(spec.src_rel)} cannot be opened at {show(rel)} "
                f"without following a symlink ({reason}); did it change since "
                "the Sporefile was loaded?",
            ) from None
        finally:
            os.close(root)

    # -- the tar ----------------------------------------------------------------------
    def write(self, out: _Sink) -> str:
        """Write the layer (plain tar, sorted, mtime = rootfs epoch, root:root); its sha256."""
        hashed = _Hashing(out)
        plan = self.plan()
        with tarfile.open(
            fileobj=hashed,
            mode="w|",
            format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
            encoding="utf-8",
        ) as tar:
            for comps in sorted(plan, key=lambda c: tuple(os.fsencode(p) for p in c)):
                entry = plan[comps]
                info = tarfile.TarInfo("/".join(comps) if comps else ".")
                info.mode, info.mtime = entry.mode, ROOTFS_EPOCH
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                    continue
                spec = self.specs[entry.index]
                fd = self._open(entry.index, spec, entry.src, directory=False)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise self.fail(
                            entry.index,
                            "src",
                            f"{show('/'.join(entry.src))} is no longer a regular file",
                        )
                    info.size = st.st_size
                    with open(fd, "rb", buffering=0, closefd=False) as fh:
                        tar.addfile(info, fh)
                    if os.read(fd, 1):  # grew while being read: the tar holds a torn copy
                        raise OSError("file grew while being read")
                except OSError as exc:
                    raise self.fail(
                        entry.index,
                        "src",
                        f"{show('/'.join(entry.src))} changed "
                        f"while being copied ({exc}); rerun the build",
                    ) from None
                finally:
                    os.close(fd)
        return "sha256:" + hashed.hash.hexdigest()

    def digest(self) -> str:
        """sha256 of the layer bytes (computed once: it reads every copied file)."""
        if self._digest is None:
            self._digest = self.write(_Null())
        return self._digest

    def write_file(self, path: Path) -> tuple[str, int]:
        """Write the layer to ``path``; fail if it differs from the digest in the key."""
        with open(path, "xb") as fh:
            got = self.write(fh)
            size = fh.tell()
        if got != self.digest():
            raise SporefileError(
                f"{self.sporefile}: files: the copied files changed during the build; rerun it"
            )
        return got, size

    def explain(self, exc: LayerError, layer_number: int) -> SporefileError | None:
        """The applier's error for a member of this layer, named by its files[i].dst."""
        msg = str(exc)
        if not msg.startswith(f"layer {layer_number} ("):
            return None
        for comps, entry in self.plan().items():
            name = "/".join(comps) if comps else "."
            marker = f" member {name!r}: "
            if marker in msg:
                problem = msg.split(marker, 1)[1].replace("; layers must name real paths", "")
                hint = (
                    "; files are never written through a symlink of the base image: copy "
                    "to the path it points to"
                    if "is a symlink" in problem
                    else ""
                )
                return self.fail(
                    entry.index,
                    "dst",
                    f"cannot place {show('/' + name)} in the image: {problem}{hint}",
                )
        return SporefileError(f"{self.sporefile}: files: {msg}")


def _check_utf8(layer: FilesLayer, i: int, name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise layer.fail(i, "src", f"{show(name)} is not valid UTF-8; rename it") from None


class _Hashing:
    def __init__(self, out: _Sink) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.out.write(data)
        return len(data)


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)


def files_layer(
    specs: tuple[FileSpec, ...], context: Path, sporefile: Path, outputs: tuple[Path, ...] = ()
) -> FilesLayer | None:
    """None without files: the rootfs key and bytes stay exactly those of the image alone."""
    return FilesLayer(specs, context, sporefile, outputs) if specs else None


__all__ = ["MEDIA_TYPE", "FilesLayer", "files_layer"]
