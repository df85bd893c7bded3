"""Path-safe application of OCI image layers to a fresh directory tree.

Every filesystem call is made relative to a directory file descriptor that was
reached from the root without following a symlink (through the shared walker,
``nofollow.py``; creation stays here, as *at() calls on those descriptors), so
nothing a layer contains can make us create, modify or follow anything outside
``dest``. The exact
semantics and every rejection rule are in docs/layers.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, overload

from sporevm import nofollow
from sporevm.build.tarsafety import (
    CHUNK,
    MAX_ID,
    MEDIA_TYPES,
    DecompressingReader,
    HashingSource,
    Limits,
    ParseState,
    Reject,
    check_magic,
    display,
    member_xattrs,
    mtime_ns,
    open_tar,
    short_digest,
    split_name,
)
from sporevm.errors import LayerError
from sporevm.store import SHA256_DIGEST

__all__ = ["ApplyStats", "Layer", "LayerStats", "Limits", "apply_layers"]

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WH = b".wh."
_WH_META = b".wh..wh."  # aufs metadata (.wh..wh.plnk, .wh..wh.aufs): skipped like containerd
_OPAQUE = b".wh..wh..opq"
_T = TypeVar("_T")
DEFAULT_LIMITS = Limits()
_SPECIAL = (tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256 of the compressed blob, "sha256:<hex>"
    media_type: str
    path: Path  # the blob file in the store


@dataclass(frozen=True)
class LayerStats:
    digest: str
    entries: int  # tar members, including whiteouts and skipped aufs metadata
    bytes: int  # regular-file content written
    compressed_bytes: int
    whiteouts: int


@dataclass(frozen=True)
class ApplyStats:
    entries: int
    bytes: int
    layers: tuple[LayerStats, ...]


def _rel(comps: Sequence[bytes]) -> bytes:
    return b"/".join(comps)


class _Tree:
    """The tree being built: a root dirfd plus a cache of the last parent chain."""

    def __init__(self, root_fd: int, limits: Limits) -> None:
        self.root = root_fd
        self.limits = limits
        # (component, fd) from the root down to the last member's parent. Removals only
        # ever touch children of the chain's end, so cached fds never go stale.
        self._chain: list[tuple[bytes, int]] = []
        self.dir_mtimes: dict[bytes, int] = {}
        self.written: set[bytes] = set()  # entries of the current layer
        self.ancestors: set[bytes] = set()  # directories holding them
        self.entries = 0
        self.bytes = 0

    def close(self) -> None:
        for _, fd in self._chain:
            os.close(fd)
        self._chain.clear()

    # -- walking ----------------------------------------------------------

    @overload
    def parent(self, comps: tuple[bytes, ...]) -> int: ...
    @overload
    def parent(self, comps: tuple[bytes, ...], create: Literal[False]) -> int | None: ...

    def parent(self, comps: tuple[bytes, ...], create: bool = True) -> int | None:
        """A dirfd for ``comps``, never reached via a symlink.

        Missing directories are created as 0755 root:root, or with ``create=False``
        the result is None (whiteouts of paths that do not exist create nothing).
        """
        keep = 0
        while keep < len(self._chain) and keep < len(comps) and self._chain[keep][0] == comps[keep]:
            keep += 1
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]
        fd = self._chain[-1][1] if self._chain else self.root
        for i in range(keep, len(comps)):
            comp = comps[i]
            try:
                child = nofollow.child_dir(fd, comp, comps[:i])
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(comp, 0o700, dir_fd=fd)
                child = nofollow.child_dir(fd, comp, comps[:i])
                try:
                    os.fchown(child, 0, 0)
                    os.fchmod(child, 0o755)
                except BaseException:
                    os.close(child)
                    raise
                self.dir_mtimes.pop(_rel(comps[: i + 1]), None)
            except OSError as exc:
                raise self._refused(comps[: i + 1], exc) from None
            self._chain.append((comp, child))
            fd = child
        return fd

    def lookup(self, comps: tuple[bytes, ...]) -> int:
        """An owned dirfd for an existing ``comps`` (uncached), never via a symlink."""
        try:
            return nofollow.open_dir(self.root, comps)
        except OSError as exc:
            raise self._refused(comps, exc) from None

    @staticmethod
    def _refused(comps: tuple[bytes, ...], exc: OSError) -> Reject:
        """The walker's refusal, said in layer terms (``comps``: the path walked)."""
        if isinstance(exc, (nofollow.MissingInPath, nofollow.NotADirectoryInPath)):
            comps = comps[: exc.depth]
        where = display(_rel(comps))
        if isinstance(exc, nofollow.MissingInPath):
            return Reject(f"'{where}' does not exist")
        if isinstance(exc, nofollow.NotADirectoryInPath):
            if exc.symlink:
                return Reject(f"parent '{where}' is a symlink; layers must name real paths")
            return Reject(f"parent '{where}' is not a directory")
        return Reject(f"cannot open '{where}': {exc.strerror}")

    def mark(self, comps: tuple[bytes, ...]) -> None:
        """Record an entry of the current layer and the directories that hold it."""
        self.written.add(_rel(comps))
        for i in range(len(comps) - 1, 0, -1):
            rel = _rel(comps[:i])
            if rel in self.ancestors:
                break
            self.ancestors.add(rel)

    # -- removal ----------------------------------------------------------

    @staticmethod
    def remove(dfd: int, name: bytes) -> None:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(os.fsdecode(name), dir_fd=dfd)  # fd-based; never follows symlinks
        else:
            os.unlink(name, dir_fd=dfd)

    def hide_lower(self, dfd: int, name: bytes, rel: bytes) -> None:
        """Remove what lower layers put at ``rel``, keeping this layer's entries."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if rel not in self.written and rel not in self.ancestors:
            self.remove(dfd, name)
        elif stat.S_ISDIR(st.st_mode):
            self.hide_children(nofollow.child_dir(dfd, name), rel, close=True)

    def hide_children(self, fd: int, rel: bytes, close: bool) -> None:
        try:
            for child in sorted(os.fsencode(n) for n in os.listdir(fd)):
                self.hide_lower(fd, child, rel + b"/" + child if rel else child)
        finally:
            if close:
                os.close(fd)

    # -- finishing ----------------------------------------------------------

    def set_dir_times(self) -> None:
        """Directory mtimes last: creating children changes them (a child's own times
        do not, so the order of the walk does not matter)."""
        for entry in nofollow.walk(self.root):
            if entry.is_dir():
                ns = self.dir_mtimes.get(_rel(tuple(os.fsencode(c) for c in entry.path)), 0)
                os.utime(entry.name, ns=(ns, ns), dir_fd=entry.dir_fd, follow_symlinks=False)
        ns = self.dir_mtimes.get(b"", 0)
        os.utime(self.root, ns=(ns, ns))


class _Applier:
    """Applies the members of one layer to the tree."""

    def __init__(self, tree: _Tree, tf: tarfile.TarFile) -> None:
        self.tree = tree
        self.tf = tf
        self.bytes = 0
        self.whiteouts = 0

    def member(self, m: tarfile.TarInfo) -> None:
        tree, limits = self.tree, self.tree.limits
        raw = m.name.encode("utf-8", "surrogateescape")
        comps = split_name(raw, limits, "name")
        dirs = comps[:-1]
        if any(c.startswith(_WH_META) for c in dirs):
            return  # inside aufs metadata
        if any(c.startswith(_WH) for c in dirs):
            raise Reject("a whiteout name is used as a directory")
        last = comps[-1] if comps else b""
        if last == _OPAQUE:
            self.whiteouts += 1
            ofd = tree.parent(dirs, create=False)
            if ofd is not None:
                tree.hide_children(ofd, _rel(dirs), close=False)
            return
        if last.startswith(_WH_META):
            return
        if last.startswith(_WH):
            target = last[len(_WH) :]
            if target in (b"", b".", b".."):
                raise Reject("whiteout does not name an entry")
            self.whiteouts += 1
            wfd = tree.parent(dirs, create=False)
            if wfd is not None:
                tree.hide_lower(wfd, target, _rel((*dirs, target)))
            return
        self._entry(m, comps)

    def _entry(self, m: tarfile.TarInfo, comps: tuple[bytes, ...]) -> None:
        tree = self.tree
        kind = tarfile.REGTYPE if m.type in tarfile.REGULAR_TYPES else m.type
        if kind not in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE, *_SPECIAL):
            raise Reject(
                f"unsupported tar member type {m.type!r} (sparse, volume and "
                "vendor types are not layer content)"
            )
        if m.mode < 0 or not (0 <= m.uid <= MAX_ID and 0 <= m.gid <= MAX_ID):
            raise Reject(f"mode/uid/gid out of range ({m.mode}, {m.uid}, {m.gid})")
        ns = mtime_ns(m)
        xattrs = member_xattrs(m)
        if not comps:
            if kind != tarfile.DIRTYPE:
                raise Reject("names the root but is not a directory")
            self._meta_fd(tree.root, m, xattrs, replace_xattrs=True)
            tree.dir_mtimes[b""] = ns
            return
        if kind == tarfile.REGTYPE and not 0 <= m.size <= tree.limits.max_total_bytes - tree.bytes:
            raise Reject(
                f"size {m.size} would exceed the limit of {tree.limits.max_total_bytes} "
                "bytes of file content per image"
            )
        link: tuple[int, bytes] | None = None
        if kind == tarfile.LNKTYPE:
            link = self._link_target(m, comps)
        try:
            pfd = tree.parent(comps[:-1])
            tree.mark(comps)
            name = comps[-1]
            if kind == tarfile.REGTYPE:
                self._file(pfd, name, m, ns, xattrs)
            elif kind == tarfile.DIRTYPE:
                self._dir(pfd, name, m, xattrs)
                tree.dir_mtimes[_rel(comps)] = ns
            elif link is not None:
                assert link is not None
                tfd, tname = link
                _create(
                    pfd,
                    name,
                    lambda: os.link(
                        tname, name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False
                    ),
                )
            else:
                self._special(pfd, name, kind, m, ns, xattrs)
        finally:
            if link is not None:
                os.close(link[0])

    def _link_target(self, m: tarfile.TarInfo, comps: tuple[bytes, ...]) -> tuple[int, bytes]:
        target = split_name(
            m.linkname.encode("utf-8", "surrogateescape"), self.tree.limits, "hardlink target"
        )
        if not target:
            raise Reject("hardlink target is the root directory")
        if target[: len(comps)] == comps:
            raise Reject("hardlink target is the entry itself or inside it")
        fd = self.tree.lookup(target[:-1])
        try:
            st = os.stat(target[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            os.close(fd)
            raise Reject(
                f"hardlink target '{display(_rel(target))}' does not exist; "
                "hardlinks must point to an earlier entry of the image"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise Reject(f"hardlink target '{display(_rel(target))}' is a directory")
        return fd, target[-1]

    def _file(
        self, pfd: int, name: bytes, m: tarfile.TarInfo, ns: int, xattrs: dict[str, bytes]
    ) -> None:
        fd = _create(pfd, name, lambda: os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd))
        try:
            remaining = m.size
            if remaining:
                src = self.tf.extractfile(m)
                assert src is not None
                while remaining:
                    block = src.read(min(remaining, CHUNK))
                    if not block:
                        raise Reject("file data is truncated")
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view) :]
                    remaining -= len(block)
            self.bytes += m.size
            self.tree.bytes += m.size
            self._meta_fd(fd, m, xattrs, replace_xattrs=False)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _dir(self, pfd: int, name: bytes, m: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
        merge = False
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                merge = True  # a dir over a dir keeps the children, takes the new metadata
            else:
                _Tree.remove(pfd, name)
                os.mkdir(name, 0o700, dir_fd=pfd)
        fd = nofollow.child_dir(pfd, name)
        try:
            self._meta_fd(fd, m, xattrs, replace_xattrs=merge)
        finally:
            os.close(fd)

    def _special(
        self,
        pfd: int,
        name: bytes,
        kind: bytes,
        m: tarfile.TarInfo,
        ns: int,
        xattrs: dict[str, bytes],
    ) -> None:
        perm = m.mode & 0o7777
        if kind == tarfile.SYMTYPE:
            target = m.linkname.encode("utf-8", "surrogateescape")
            if not target or b"\0" in target or len(target) > self.tree.limits.max_name_bytes:
                raise Reject("symlink target is empty, contains NUL or is too long")
            # Any target text is fine: we never follow symlinks while building.
            _create(pfd, name, lambda: os.symlink(target, name, dir_fd=pfd))
        else:
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                if not (0 <= m.devmajor < 2**32 and 0 <= m.devminor < 2**32):
                    raise Reject("device number out of range")
                ftype = stat.S_IFCHR if kind == tarfile.CHRTYPE else stat.S_IFBLK
                dev = os.makedev(m.devmajor, m.devminor)
            else:
                ftype, dev = stat.S_IFIFO, 0
            _create(pfd, name, lambda: os.mknod(name, ftype | 0o600, dev, dir_fd=pfd))
        os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if kind != tarfile.SYMTYPE:
            os.chmod(name, perm, dir_fd=pfd)  # just created by us, not a symlink
        if xattrs:
            # No *at() form of setxattr: go through the pinned parent's /proc/self/fd entry.
            path = b"/proc/self/fd/%d/%s" % (pfd, name)
            for key, value in xattrs.items():
                os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    @staticmethod
    def _meta_fd(
        fd: int, m: tarfile.TarInfo, xattrs: dict[str, bytes], replace_xattrs: bool
    ) -> None:
        # chown before chmod: chown clears setuid/setgid. xattrs after chown, which
        # drops security.capability.
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        if replace_xattrs:
            for key in os.listxattr(fd):
                if key not in xattrs:
                    os.removexattr(fd, key)
        for key, value in xattrs.items():
            os.setxattr(fd, key, value)


def _create(pfd: int, name: bytes, make: Callable[[], _T]) -> _T:
    """Create ``name``; if something is there, remove it (never following it) and retry."""
    try:
        return make()
    except FileExistsError:
        pass
    _Tree.remove(pfd, name)
    return make()


def _apply_layer(
    tree: _Tree,
    layer: Layer,
    index: int,
    progress: Callable[[int], None] | None,
    budget: Callable[[int], None],
) -> LayerStats:
    short = short_digest(layer.digest)
    where = f"layer {index + 1} ({short})"
    fmt = MEDIA_TYPES.get(layer.media_type)
    if fmt is None:
        raise LayerError(
            f"{where}: unknown media type {layer.media_type!r}; supported: "
            + ", ".join(sorted(MEDIA_TYPES))
        )
    if not SHA256_DIGEST.fullmatch(layer.digest):
        raise LayerError(f"{where}: digest {layer.digest!r} is not sha256:<64 lowercase hex>")
    tree.written.clear()
    tree.ancestors.clear()
    state = ParseState(tree.limits)
    try:
        fh = open(layer.path, "rb")  # closed by the with-block below
    except OSError as exc:
        raise LayerError(f"{where}: cannot read blob {layer.path}: {exc.strerror}") from None
    with fh:
        src = HashingSource(fh)
        complaint = check_magic(src.peek(10), fmt)
        if complaint:
            raise LayerError(f"{where}: {complaint}; the manifest and blob disagree")
        with DecompressingReader(src, fmt, budget, progress) as reader:
            entries, applier = _read_members(tree, reader, state, where)
        src.drain()
        if progress is not None and src.consumed > reader.reported:
            progress(src.consumed - reader.reported)
        got = src.hexdigest()
        if got != layer.digest:
            raise LayerError(
                f"{where}: blob sha256 is {got}, expected {layer.digest}; the "
                "store entry is corrupt: run `spore cache prune --all` and rebuild"
            )
    return LayerStats(
        layer.digest,
        entries,
        applier.bytes if applier else 0,
        src.consumed,
        applier.whiteouts if applier else 0,
    )


def _read_members(
    tree: _Tree, reader: DecompressingReader, state: ParseState, where: str
) -> tuple[int, _Applier | None]:
    prev: str | None = None

    def context() -> str:
        return f"after member {prev!r}" if prev is not None else "at the first member"

    try:
        tf = open_tar(reader, state)
    except LayerError as exc:
        raise LayerError(f"{where} {context()}: {exc}") from None
    except (tarfile.TarError, ValueError) as exc:
        if reader.total_out == 0:
            return 0, None  # an empty stream is an empty layer
        raise LayerError(f"{where}: not a valid tar stream: {exc}") from None
    applier = _Applier(tree, tf)
    entries = 0
    with tf:
        while True:
            try:
                m = tf.next()
            except LayerError as exc:
                raise LayerError(f"{where} {context()}: {exc}") from None
            except (tarfile.TarError, ValueError, EOFError) as exc:
                raise LayerError(f"{where} {context()}: malformed tar: {exc}") from None
            if m is None:
                break
            entries += 1
            tree.entries += 1
            if tree.entries > tree.limits.max_entries:
                raise LayerError(
                    f"{where}: more than {tree.limits.max_entries} entries in the "
                    "image; refusing (raise Limits.max_entries if expected)"
                )
            prev = m.name
            try:
                applier.member(m)
            except Reject as exc:
                raise LayerError(f"{where} member {m.name!r}: {exc}") from None
            except LayerError as exc:
                raise LayerError(f"{where} member {m.name!r}: {exc}") from None
            except (tarfile.TarError, EOFError) as exc:
                raise LayerError(f"{where} member {m.name!r}: malformed tar: {exc}") from None
            except OSError as exc:
                raise LayerError(
                    f"{where} member {m.name!r}: {exc.strerror or exc} (applying layers needs root)"
                ) from None
        if state.bad_header is not None:
            raise LayerError(
                f"{where} {context()}: corrupt tar header ({state.bad_header}); "
                "the layer is truncated or damaged"
            )
        if entries and not _end_marker_ok(tf):
            raise LayerError(
                f"{where} {context()}: data after the end-of-archive marker is "
                "not zero; the layer is damaged"
            )
    # Decompress to the end (ignoring the bytes, as Go's archive/tar users do) so a
    # truncated or corrupt compressed stream is an error, not a silently short layer.
    try:
        while reader.read(CHUNK):
            pass
    except (tarfile.TarError, LayerError) as exc:
        raise LayerError(f"{where} after the last member: {exc}") from None
    return entries, applier


def _end_marker_ok(tf: tarfile.TarFile) -> bool:
    # tarfile stops at the first zero block; Go's archive/tar (which writes most
    # layers) treats a non-zero second block as an error, and so do we.
    try:
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, ValueError):
        return False
    return block.count(0) == len(block)


def apply_layers(
    layers: Sequence[Layer],
    dest: Path,
    limits: Limits = DEFAULT_LIMITS,
    progress: Callable[[int], None] | None = None,
) -> ApplyStats:
    """Create ``dest`` and apply ``layers`` in order; on any failure remove ``dest``.

    ``progress(n)`` is called with the number of compressed bytes just consumed.
    """
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        raise LayerError(
            f"{dest}: already exists; layers are applied into a new directory only"
        ) from None
    except OSError as exc:
        raise LayerError(f"{dest}: cannot create: {exc.strerror}") from None
    try:
        root = nofollow.open_root(dest, follow=False)
        tree = _Tree(root, limits)
        try:
            os.fchown(root, 0, 0)
            os.fchmod(root, 0o755)
            out = 0

            def budget(n: int) -> None:
                nonlocal out
                out += n
                if out > limits.max_stream_bytes:
                    raise LayerError(
                        f"more than {limits.max_stream_bytes} bytes of decompressed "
                        "tar in the image; refusing (decompression bomb?)"
                    )

            done = [
                _apply_layer(tree, layer, i, progress, budget) for i, layer in enumerate(layers)
            ]
            tree.close()
            tree.set_dir_times()
        finally:
            tree.close()
            os.close(root)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(dest)
        raise
    return ApplyStats(tree.entries, tree.bytes, tuple(done))
