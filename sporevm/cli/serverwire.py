"""The resident server's wire format and where its socket lives (docs/server.md).

The thin client (``sporevm.cli.client``) imports this module on every `spore run`, so
it imports nothing beyond ``os``, ``sys`` and ``binascii``: no json, struct, socket
or enum (each costs an import the run would otherwise not pay).

A request is one frame, ``b"SPRQ"`` + u32 little-endian payload length + payload,
sent with exactly three descriptors (the client's stdin, stdout and stderr) in
SCM_RIGHTS. The payload is a sequence of NUL-terminated fields, all UTF-8 with
surrogate escapes (``os.fsencode``): the protocol tag, the client's install (see
``install_id``), its working directory, its umask in octal, ``argc`` then the
arguments, ``envc`` then ``NAME=VALUE`` pairs. Nothing may follow the last field.

Replies are records of a kind byte and a fixed or prefixed body: ``P`` + u32 (the
handler's pid: the run started), ``X`` + i32 (its exit code: the run ended), ``R`` +
u16 length + UTF-8 text (refused: nothing ran, the client runs the command itself).
"""

from __future__ import annotations

import binascii
import os
import sys

PROTOCOL = b"spore-server/1"
MAGIC = b"SPRQ"
HEADER = 8  # MAGIC + u32 length
MAX_PAYLOAD = 1 << 20
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_REASON = 1024
FDS = 3  # stdin, stdout, stderr


class WireError(ValueError):
    """A frame or record that does not follow the format above."""


class Request:
    """One decoded request: the command line of a `spore` run and its surroundings."""

    __slots__ = ("install", "cwd", "umask", "argv", "env")

    def __init__(
        self, install: str, cwd: str, umask: int, argv: list[str], env: dict[str, str]
    ) -> None:
        self.install = install
        self.cwd = cwd
        self.umask = umask
        self.argv = argv
        self.env = env

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


def install_id() -> str:
    """This environment (``sys.prefix``: the venv), its interpreter and the directory
    spore's package is loaded from: a server answers only clients of the very same
    install (docs/server.md, "Which server"). Computed by a process that ran ``site``
    (the CLI): the server, started without it, is handed its starter's."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"{sys.prefix}:{os.path.realpath(sys.executable)}:{package}"


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR/spore`` when that is an absolute path, else ``/tmp/spore-<uid>``.
    ``check_runtime_dir`` decides whether it may be used."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if base.startswith("/"):
        return os.path.join(base, "spore")
    return f"/tmp/spore-{os.getuid()}"


def check_runtime_dir(path: str, *, create: bool) -> str | None:
    """None when ``path`` is a real directory owned by this user that nobody else can
    enter (created 0700 when ``create``); else why not, in words."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror}"
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    import stat

    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})"
    if st.st_mode & 0o077:
        return f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); chmod 700 it"
    return None


def server_files(base: str, install: str) -> tuple[str, str, str]:
    """The server's socket, lock and log in ``base``: ``server-<crc>.{sock,lock,log}``,
    one name per install (the install itself is checked on connect)."""
    name = f"server-{binascii.crc32(install.encode('utf-8', 'surrogateescape')):08x}"
    sock, lock, log = (os.path.join(base, name + ext) for ext in (".sock", ".lock", ".log"))
    return sock, lock, log


def lock_holder(fd: int) -> int:
    """The pid a server wrote into its lock file (0 when it names none)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0


# --- the request -------------------------------------------------------------------------


def _field(text: str) -> bytes:
    raw = os.fsencode(text)
    if b"\0" in raw:
        raise WireError("a field holds a NUL byte")
    return raw + b"\0"


def encode_request(req: Request) -> bytes:
    if len(req.argv) > MAX_ARGS or len(req.env) > MAX_ENV:
        raise WireError("too many arguments or environment variables for the server")
    parts = [PROTOCOL + b"\0", _field(req.install), _field(req.cwd)]
    parts.append(_field(f"{req.umask:o}"))
    parts.append(_field(str(len(req.argv))))
    parts.extend(_field(a) for a in req.argv)
    parts.append(_field(str(len(req.env))))
    for name, value in req.env.items():
        if not name or "=" in name:
            raise WireError(f"environment variable name {name!r} cannot be sent")
        parts.append(_field(f"{name}={value}"))
    payload = b"".join(parts)
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"request of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return MAGIC + len(payload).to_bytes(4, "little") + payload


def frame_length(header: bytes) -> int:
    """The payload length a request header announces (``HEADER`` bytes)."""
    if len(header) != HEADER or header[:4] != MAGIC:
        raise WireError("not a spore server request (bad magic)")
    n = int.from_bytes(header[4:], "little")
    if n > MAX_PAYLOAD:
        raise WireError(f"request of {n} bytes is over {MAX_PAYLOAD}")
    return n


def _count(raw: str, limit: int, what: str) -> int:
    if not raw.isdigit() or not raw.isascii() or (len(raw) > 1 and raw[0] == "0"):
        raise WireError(f"{what} count {raw!r} is not a decimal number")
    n = int(raw)
    if n > limit:
        raise WireError(f"{what} count {n} is over {limit}")
    return n


def decode_request(frame: bytes) -> Request:
    """The request in a whole frame (header included); WireError on anything else."""
    n = frame_length(frame[:HEADER])
    payload = frame[HEADER:]
    if len(payload) != n:
        raise WireError(f"payload is {len(payload)} bytes, the header says {n}")
    if not payload.endswith(b"\0"):
        raise WireError("the last field is not NUL-terminated")
    fields = payload[:-1].split(b"\0")
    if fields[0] != PROTOCOL:
        raise WireError(f"protocol {fields[0][:40]!r} is not {PROTOCOL.decode()}")
    texts = [os.fsdecode(f) for f in fields[1:]]
    if len(texts) < 5:
        raise WireError("request is missing fields")
    install, cwd, umask_text = texts[0], texts[1], texts[2]
    if not cwd.startswith("/"):
        raise WireError(f"working directory {cwd[:80]!r} is not absolute")
    if (
        not umask_text
        or len(umask_text) > 3
        or any(c not in "01234567" for c in umask_text)
        or (len(umask_text) > 1 and umask_text[0] == "0")
    ):
        raise WireError(f"umask {umask_text[:8]!r} is not 1-3 octal digits without a leading 0")
    umask = int(umask_text, 8)
    argc = _count(texts[3], MAX_ARGS, "argument")
    rest = texts[4:]
    if len(rest) < argc + 1:
        raise WireError("request ends inside its arguments")
    argv, rest = rest[:argc], rest[argc:]
    envc = _count(rest[0], MAX_ENV, "environment")
    pairs = rest[1:]
    if len(pairs) != envc:
        raise WireError(f"{len(pairs)} environment entries, the count says {envc}")
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise WireError(f"environment entry {pair[:40]!r} is not NAME=VALUE")
        if name in env:
            raise WireError(f"environment variable {name[:40]!r} is given twice")
        env[name] = value
    return Request(install, cwd, umask, argv, env)


# --- the replies -------------------------------------------------------------------------


def started(pid: int) -> bytes:
    return b"P" + pid.to_bytes(4, "little")


def exited(code: int) -> bytes:
    return b"X" + code.to_bytes(4, "little", signed=True)


def refused(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")[:MAX_REASON]
    return b"R" + len(raw).to_bytes(2, "little") + raw


def decode_reply(buf: bytes) -> tuple[str, int | str, int] | None:
    """The first record in ``buf``: (kind, value, bytes used), or None while it is
    incomplete. WireError for an unknown kind or a value out of range."""
    if not buf:
        return None
    kind = buf[:1]
    if kind in (b"P", b"X"):
        if len(buf) < 5:
            return None
        if kind == b"P":
            pid = int.from_bytes(buf[1:5], "little")
            if not 1 < pid < 1 << 22:  # PID_MAX_LIMIT
                raise WireError(f"handler pid {pid} is out of range")
            return "P", pid, 5
        code = int.from_bytes(buf[1:5], "little", signed=True)
        if not 0 <= code <= 255:
            raise WireError(f"exit code {code} is out of range")
        return "X", code, 5
    if kind == b"R":
        if len(buf) < 3:
            return None
        n = int.from_bytes(buf[1:3], "little")
        if n > MAX_REASON:
            raise WireError(f"refusal of {n} bytes is over {MAX_REASON}")
        if len(buf) < 3 + n:
            return None
        return "R", buf[3 : 3 + n].decode("utf-8", "replace"), 3 + n
    raise WireError(f"unknown reply kind {kind!r}")
