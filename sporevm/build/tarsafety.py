"""Reading untrusted layer blobs: verified, bounded decompression and bounded tar headers.

This module turns a layer blob into a stream of tar members without trusting
anything in it: compressed bytes are hashed as they are read, decompressed
output is counted against a budget, and tar extension headers (PAX, GNU long
names) are size-checked *before* they are read into memory. Applying members
to a directory tree is ``sporevm.build.layers``' job.
"""

from __future__ import annotations

import hashlib
import math
import queue
import re
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Self

import zstandard

from sporevm.errors import LayerError

GiB = 1 << 30
CHUNK = 1 << 20  # compressed read size and largest decompressed piece handed out

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Signatures that must not start a blob declared as an uncompressed tar.
_OTHER_MAGIC = (GZIP_MAGIC, ZSTD_MAGIC, b"\xfd7zXZ\x00")
_BZIP2 = re.compile(rb"BZh[1-9]1AY&SY")

# Media types → compression. The nondistributable variants are the same formats.
MEDIA_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default decoder limit (128 MiB of window memory)
MAX_HEADER_CHAIN = 8  # PAX + GNU long name + GNU long link never legitimately nest deeper


@dataclass(frozen=True)
class Limits:
    """Bounds applied per image (all layers together); see docs/layers.md."""

    max_entries: int = 1_000_000
    max_total_bytes: int = 16 * GiB  # sum of regular-file sizes
    max_name_bytes: int = 4096
    max_component_bytes: int = 255
    max_header_bytes: int = 1 << 20  # one PAX or GNU long-name/long-link header
    max_link_hops: int = 40
    max_depth: int = 256  # path components; keeps every tree walk far from recursion limits
    max_stream_bytes: int = 32 * GiB  # decompressed tar bytes


def short_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest[:19]


def display(raw: bytes) -> str:
    """A member name as printable text for error messages."""
    return raw.decode("utf-8", "backslashreplace")


# -- compressed input ----------------------------------------------------------


class HashingSource:
    """Reads a blob file, hashing every byte exactly once."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self.consumed = 0  # read by the consumer thread for progress; int reads are atomic
        self._head = b""  # bytes peeked for the magic check, not yet handed out

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            block = self._take(n - len(self._head))
            if not block:
                break
            self._head += block
        return self._head[:n]

    def _take(self, n: int) -> bytes:
        block = self._fh.read(n)
        if block:
            self._hash.update(block)
            self.consumed += len(block)
        return block

    def read(self, n: int = CHUNK) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._take(max(1, min(n, CHUNK)))

    def drain(self) -> None:
        """Consume the rest of the blob (data after the tar end) so the digest covers it all."""
        self._head = b""
        while self._take(CHUNK):
            pass

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _GzipDecoder:
    """gzip (multi-member, trailing zero padding allowed) with bounded output pieces.

    Input is fed in 64 KiB slices: zlib copies the unconsumed input on every
    bounded call, so feeding 1 MiB at once would copy it over and over.
    """

    _SLICE = 64 << 10

    def __init__(self, src: HashingSource) -> None:
        self._src = src
        self._z: Any = None  # zlib decompress object of the current member, None between members
        self._buf = b""
        self._pos = 0
        self._tail = b""  # input given to zlib but not consumed yet, fed first
        self._padding = False

    def read(self, n: int) -> bytes:
        while True:
            if self._tail:
                data, self._tail = self._tail, b""
            else:
                if self._pos >= len(self._buf):
                    self._buf, self._pos = self._src.read(CHUNK), 0
                    if not self._buf:
                        if self._z is not None:
                            raise ValueError("gzip stream is truncated")
                        return b""
                data = self._buf[self._pos : self._pos + self._SLICE]
                self._pos += len(data)
            if self._z is None:
                if self._padding or data[0] == 0:
                    # Zero padding after the last member (as gzip(1) accepts); nothing else.
                    if data.count(0) != len(data):
                        raise ValueError("data after gzip padding")
                    self._padding = True
                    continue
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out: bytes = self._z.decompress(data, n)
            if self._z.eof:
                self._tail = self._z.unused_data
                self._z = None
            else:
                self._tail = self._z.unconsumed_tail
            if out:
                return out


class _ZstdDecoder:
    """zstd (multi-frame) that notices truncation, with bounded output per step.

    zstandard's stream_reader silently ends on a truncated frame, and its
    decompressobj has no output bound, so input is fed in 1 KiB slices: one
    slice can expand to at most ~32 MiB (RLE blocks of 128 KiB from 4 bytes).
    """

    _SLICE = 1024

    def __init__(self, src: HashingSource) -> None:
        self._src = src
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._d: Any = None  # decompress object of the current frame
        self._buf = b""
        self._pos = 0
        self._carry = b""  # input left over after a frame ended, fed first
        self._out = b""
        self._outpos = 0

    def read(self, n: int) -> bytes:
        while True:
            if self._outpos < len(self._out):
                piece = self._out[self._outpos : self._outpos + n]
                self._outpos += len(piece)
                return piece
            if self._carry:
                data, self._carry = self._carry, b""
            else:
                if self._pos >= len(self._buf):
                    self._buf, self._pos = self._src.read(CHUNK), 0
                    if not self._buf:
                        if self._d is not None:
                            raise ValueError("zstd stream is truncated")
                        return b""
                data = self._buf[self._pos : self._pos + self._SLICE]
                self._pos += len(data)
            if self._d is None:
                self._d = self._dctx.decompressobj()
            self._out, self._outpos = self._d.decompress(data), 0
            if self._d.eof:
                self._carry = self._d.unused_data
                self._d = None


class DecompressingReader:
    """File-like ``read(n)`` over a blob's decompressed tar stream, counting output bytes.

    A read-ahead thread reads, hashes and decompresses (zlib, zstd and sha256
    release the GIL) while the caller creates files, so the two overlap. At most
    DEPTH pieces of PIECE bytes wait in the queue, so a decompression bomb is
    still caught by ``budget`` long before memory matters. ``budget`` and
    ``progress`` run in the caller's thread. Use as a context manager.
    """

    PIECE = 256 << 10
    DEPTH = 8

    def __init__(
        self,
        src: HashingSource,
        fmt: str,
        budget: Callable[[int], None],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._src = src
        self._budget = budget
        self._progress = progress
        self.reported = 0
        self.total_out = 0
        self._fmt = fmt
        decode: Callable[[int], bytes]
        if fmt == "tar":
            decode, size = src.read, CHUNK
        elif fmt == "gzip":
            decode, size = _GzipDecoder(src).read, self.PIECE
        elif fmt == "zstd":
            decode, size = _ZstdDecoder(src).read, self.PIECE
        else:  # pragma: no cover - callers only pass MEDIA_TYPES values
            raise AssertionError(fmt)
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(decode, size), name="layer-read-ahead", daemon=True
        )
        self._thread.start()

    def _produce(self, decode: Callable[[int], bytes], size: int) -> None:
        item: bytes | BaseException
        while not self._stop.is_set():
            try:
                item = decode(size)
            except (zlib.error, zstandard.ZstdError, ValueError) as exc:
                item = tarfile.ReadError(f"corrupt {self._fmt} data: {exc}")
            except OSError as exc:
                item = tarfile.ReadError(f"cannot read the blob: {exc.strerror or exc}")
            except BaseException as exc:  # a bug: hand it to the caller's thread
                item = exc
            self._queue.put(item)
            if not isinstance(item, bytes) or not item:
                return

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._report()

    def __enter__(self) -> DecompressingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _report(self) -> None:
        if self._progress is not None:
            consumed = self._src.consumed
            if consumed > self.reported:
                self._progress(consumed - self.reported)
                self.reported = consumed

    def read(self, n: int = CHUNK) -> bytes:
        if self._pos >= len(self._buf):
            if self._eof:
                return b""
            item = self._queue.get()
            self._report()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return b""
            self.total_out += len(item)
            self._budget(len(item))
            self._buf, self._pos = item, 0
        if self._pos == 0 and n >= len(self._buf):
            out = self._buf  # the whole piece: no copy
        else:
            out = self._buf[self._pos : self._pos + max(1, n)]
        self._pos += len(out)
        return out


def check_magic(head: bytes, fmt: str) -> str | None:
    """Return a complaint if the first bytes of a blob disagree with its media type."""
    if fmt == "gzip" and not head.startswith(GZIP_MAGIC):
        return "media type says gzip but the blob does not start with the gzip magic 1f8b"
    if fmt == "zstd" and not head.startswith(ZSTD_MAGIC):
        return "media type says zstd but the blob does not start with the zstd magic 28b52ffd"
    if fmt == "tar" and (head.startswith(_OTHER_MAGIC) or _BZIP2.match(head)):
        return "media type says uncompressed tar but the blob is compressed"
    return None


# -- tar headers ----------------------------------------------------------------


@dataclass
class ParseState:
    """Per-layer parser state shared by the TarFile and the TarInfo objects it creates."""

    limits: Limits
    depth: int = 0
    bad_header: str | None = None  # why tarfile stopped early, if not a clean end


def _reject(msg: str) -> LayerError:
    # Raised from inside tarfile's header parsing; layers.py prefixes the layer digest.
    return LayerError(msg)


_DIGITS = re.compile(rb"[0-9]{1,19}")
_MTIME = re.compile(rb"-?[0-9]{1,19}(\.[0-9]{1,19})?")
_XATTR_PREFIX = "SCHILY.xattr."


def parse_pax(buf: bytes) -> dict[str, bytes]:
    """Parse PAX records ``"<len> <key>=<value>\\n"`` in linear time, strictly.

    tarfile's own parser searches the buffer with a backtracking regex that is
    quadratic on hostile input (CPython gh-121285), so we never hand it PAX data.
    """
    out: dict[str, bytes] = {}
    pos, end = 0, len(buf)
    while pos < end:
        if buf.count(0, pos) == end - pos:
            break  # NUL padding some writers leave after the last record
        sp = buf.find(b" ", pos, min(end, pos + 21))
        if sp < 0 or not _DIGITS.fullmatch(buf, pos, sp):
            raise _reject(f"malformed PAX record at byte {pos}: no decimal length")
        length = int(buf[pos:sp])
        stop = pos + length
        if stop > end or stop <= sp + 2 or buf[stop - 1] != 0x0A:
            raise _reject(f"malformed PAX record at byte {pos}: bad length {length}")
        eq = buf.find(b"=", sp + 1, stop - 1)
        if eq <= sp + 1:
            raise _reject(f"malformed PAX record at byte {pos}: no keyword")
        try:
            key = buf[sp + 1 : eq].decode("utf-8")
        except UnicodeDecodeError:
            raise _reject(f"malformed PAX record at byte {pos}: keyword is not UTF-8") from None
        out[key] = buf[eq + 1 : stop - 1]
        pos = stop
    return out


def _pax_int(key: str, value: bytes) -> int:
    if not _DIGITS.fullmatch(value):
        raise _reject(f"PAX {key}={display(value)!r} is not a decimal number")
    return int(value)


def _block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class LayerTarFile(tarfile.TarFile):
    """A TarFile that carries our ParseState and never keeps old members.

    The state must exist before ``TarFile.__init__`` reads the first member,
    so it is a constructor argument that ``TarFile.open`` passes through.
    """

    members: list[tarfile.TarInfo]  # set by TarFile.__init__; declared for the type checker

    def __init__(self, *args: Any, spore_state: ParseState, **kwargs: Any) -> None:
        self.spore_state = spore_state
        super().__init__(*args, **kwargs)

    def next(self) -> tarfile.TarInfo | None:
        member = super().next()
        # Stream mode never revisits members; keeping them would cost memory per entry.
        self.members.clear()
        return member


def _state_of(tf: tarfile.TarFile) -> ParseState:
    if not isinstance(tf, LayerTarFile):  # pragma: no cover - only LayerTarFile uses this class
        raise TypeError("BoundedTarInfo must be used with LayerTarFile")
    return tf.spore_state


class BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that bounds and parses extension headers itself.

    This hooks ``_proc_member``, a private method that tarfile's source documents
    as the extension point for subclasses ("can be overridden in a subclass").
    tarfile would otherwise read a PAX or GNU long-name payload of any declared
    size into memory, parse PAX with a quadratic regex, apply PAX *global*
    headers to later members (Go's archive/tar, which builds most images, does
    not), and silently accept sparse files. tests/test_layers.py pins this hook.
    """

    spore_xattrs: dict[str, bytes] | None = None

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile)
        except (_TAR.InvalidHeaderError, _TAR.TruncatedHeaderError) as exc:
            # tarfile treats a corrupt header after the first member as the end of
            # the archive; remember it so the caller fails instead of truncating.
            _state_of(tarfile).bad_header = str(exc) or type(exc).__name__
            raise
        except _TAR.EmptyHeaderError:
            # The stream ended at a block boundary without the end-of-archive
            # marker: a truncated layer unless it is the very first header.
            _state_of(tarfile).bad_header = "stream ends without the end-of-archive marker"
            raise

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        state = _state_of(tf)
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            return self._extension(tf, state, "GNU long name")
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            return self._extension(tf, state, "PAX")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _reject(
                f"member {self.name!r} is a GNU sparse file; sparse files are "
                "not supported in layers (re-create the layer without --sparse)"
            )
        result: tarfile.TarInfo = _BASE_PROC_MEMBER(self, tf)
        return result

    def _extension(self, tf: tarfile.TarFile, state: ParseState, kind: str) -> tarfile.TarInfo:
        limits = state.limits
        if self.size < 0 or self.size > limits.max_header_bytes:
            raise _reject(
                f"{kind} header declares {self.size} bytes, more than the limit of "
                f"{limits.max_header_bytes}; the layer is malformed or hostile"
            )
        if state.depth >= MAX_HEADER_CHAIN:
            raise _reject(f"more than {MAX_HEADER_CHAIN} chained tar extension headers")
        buf = tf.fileobj.read(_block(self.size))
        if len(buf) < self.size:
            raise _reject(f"{kind} header is truncated")
        buf = buf[: self.size]
        records = parse_pax(buf) if kind == "PAX" else {}
        state.depth += 1
        try:
            nxt = self.fromtarfile(tf)
        except _TAR.HeaderError as exc:
            raise _TAR.SubsequentHeaderError(str(exc)) from None
        finally:
            state.depth -= 1
        nxt.offset = self.offset
        if self.type == tarfile.GNUTYPE_LONGNAME:
            nxt.name = _nts(buf)
        elif self.type == tarfile.GNUTYPE_LONGLINK:
            nxt.linkname = _nts(buf)
        elif self.type != tarfile.XGLTYPE:
            # Global PAX headers are ignored, as containerd and Go's archive/tar do.
            _apply_pax(nxt, records, tf)
        if nxt.isdir():
            nxt.name = nxt.name.rstrip("/")
        return nxt


def _nts(buf: bytes) -> str:
    nul = buf.find(b"\0")
    return (buf if nul < 0 else buf[:nul]).decode("utf-8", "surrogateescape")


def _apply_pax(member: tarfile.TarInfo, records: dict[str, bytes], tf: tarfile.TarFile) -> None:
    xattrs: dict[str, bytes] = {}
    for key, value in records.items():
        if key.startswith("GNU.sparse."):
            raise _reject(
                f"member {member.name!r} is a GNU sparse file (PAX {key}); sparse "
                "files are not supported in layers"
            )
        if key.startswith(_XATTR_PREFIX):
            xattrs[key[len(_XATTR_PREFIX) :]] = value
        elif key == "path":
            member.name = value.decode("utf-8", "surrogateescape").rstrip("/")
        elif key == "linkpath":
            member.linkname = value.decode("utf-8", "surrogateescape")
        elif key in ("uid", "gid"):
            setattr(member, key, _pax_int(key, value))
        elif key == "mtime":
            if not _MTIME.fullmatch(value):
                raise _reject(f"PAX mtime={display(value)!r} is not a decimal time")
            member.mtime = float(value) if b"." in value else int(value)
        elif key == "size":
            member.size = _pax_int(key, value)
            # The data offset was computed from the ustar size field; redo it.
            if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                tf.offset = member.offset_data + _block(member.size)
        # Other keys (uname, gname, atime, ctime, comment, charset, ...) do not
        # affect the tree we build.
    if xattrs:
        if isinstance(member, BoundedTarInfo):
            member.spore_xattrs = xattrs


_TAR: Any = tarfile  # tarfile's header exception classes are not in typeshed
# Looked up explicitly so a Python whose tarfile lacks the hook fails at import.
_BASE_PROC_MEMBER: Callable[[tarfile.TarInfo, tarfile.TarFile], tarfile.TarInfo] = vars(
    tarfile.TarInfo
)["_proc_member"]


def open_tar(reader: IO[bytes] | DecompressingReader, state: ParseState) -> LayerTarFile:
    tf = LayerTarFile.open(  # type: ignore[call-overload]
        fileobj=reader,
        mode="r|",
        tarinfo=BoundedTarInfo,
        encoding="utf-8",
        errors="surrogateescape",
        spore_state=state,
    )
    assert isinstance(tf, LayerTarFile)
    return tf


# -- member fields -----------------------------------------------------------------

XATTR_NAMESPACES = ("security.", "trusted.", "user.")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown, so it is not an id
NS_LIMIT = 2**63


class Reject(Exception):
    """A member problem; the caller adds the layer digest and member name."""


def split_name(raw: bytes, limits: Limits, what: str) -> tuple[bytes, ...]:
    """Split a member or hardlink name into literal components, rejecting unsafe ones."""
    if not raw:
        raise Reject(f"{what} is empty")
    if b"\0" in raw:
        raise Reject(f"{what} contains a NUL byte")
    if len(raw) > limits.max_name_bytes:
        raise Reject(f"{what} is {len(raw)} bytes, over the limit of {limits.max_name_bytes}")
    # A leading "/" is dropped like every OCI tool does; "." and empty parts are no-ops.
    comps = tuple(c for c in raw.split(b"/") if c and c != b".")
    for comp in comps:
        if comp == b"..":
            raise Reject(f"{what} contains '..'; layers must name paths inside the root")
        if len(comp) > limits.max_component_bytes:
            raise Reject(
                f"{what} has a component of {len(comp)} bytes, over the limit of "
                f"{limits.max_component_bytes}"
            )
    if len(comps) > limits.max_depth:
        raise Reject(f"{what} is {len(comps)} levels deep, over the limit of {limits.max_depth}")
    return comps


def mtime_ns(member: tarfile.TarInfo) -> int:
    mtime = member.mtime
    if isinstance(mtime, float):
        if not math.isfinite(mtime):
            raise Reject("mtime is not finite")
        ns = round(mtime * 1e9)
    else:
        ns = mtime * 1_000_000_000
    if not -NS_LIMIT < ns < NS_LIMIT:
        raise Reject(f"mtime {mtime} is out of range")
    return ns


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    found: dict[str, bytes] | None = getattr(member, "spore_xattrs", None)
    if not found:
        return {}
    for key, value in found.items():
        if not key.startswith(XATTR_NAMESPACES) or "\0" in key or len(key.encode()) > 255:
            raise Reject(f"xattr {key!r} is not supported (allowed: security.*, trusted.*, user.*)")
        if len(value) > 65536:
            raise Reject(f"xattr {key!r} value is {len(value)} bytes, over 65536")
    return found
