"""Starting Debian's ``passt`` for one gateway and connecting to it.

passt terminates the guest's TCP/UDP flows in host sockets; it is told to forward no
host port to the guest (``-t none -u none``), not to map the gateway's address to the
host's loopback (``--no-map-gw``), to run no DHCP/NDP/RA, IPv4 only, no ICMP, and to
quit when its one client leaves (``-1``). It sandboxes itself (new user, mount, IPC
and UTS namespaces, an empty read-only root, its own seccomp filter) and drops to
``--runas``.

Its ``--fd`` option (a pre-opened socket) crashes the Debian 12 build at the first TCP
handshake (SIGSEGV, checked here), so passt listens on a UNIX socket in a fresh
directory only its user can enter; the gateway connects, checks with SO_PEERCRED that
the listener is the passt it started, and removes socket and directory at once.
When root, passt runs as ``PASST_UID``, a uid nothing else uses, so no other process
(not even one running as ``nobody``) can reach that directory in the moment between
passt's bind and our connect.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sporevm.egress import EgressError
from sporevm.egress.filter import Link
from sporevm.egress.packets import mac_text
from sporevm.egress.policy import ntoa

PASST_UID = 2_147_400_000  # root only: passt's own uid and gid (no name, no files)
START_TIMEOUT_S = 5.0
MAX_STDERR = 64 << 10  # what the gateway passes on of passt's messages
# What passt prints whatever --quiet says: syslog failures (its sandbox has no /dev/log)
# and the QEMU command line to use; the rest (errors) is passed on.
_NOISE = (
    "Failed to send",
    "UNIX domain socket bound",
    "You can now start qemu",
    "kvm ... -device",
    "or qrap",
    "./qrap",
)


def _messages(data: bytes) -> str:
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(ln for ln in lines if ln.strip() and not ln.strip().startswith(_NOISE))


@dataclass
class Passt:
    proc: subprocess.Popen[bytes]
    sock: socket.socket

    def drain_stderr(self) -> str:
        """passt's messages since the last call, noise removed (the pipe never fills)."""
        assert self.proc.stderr is not None
        try:
            data = os.read(self.proc.stderr.fileno(), MAX_STDERR)
        except BlockingIOError:
            return ""
        return _messages(data)

    def close(self) -> None:
        """Close our end (passt -1 then exits) and reap it, killing it after a grace."""
        self.sock.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def argv(binary: str, link: Link, sock_path: Path, runas: str | None) -> list[str]:
    args = [
        binary,
        "--foreground",
        "--quiet",
        "--stderr",
        "--one-off",
        "--ipv4-only",
        "--socket",
        str(sock_path),
        "--address",
        ntoa(link.guest_ip),
        "--netmask",
        str(link.prefix),
        "--gateway",
        ntoa(link.gateway_ip),
        "--mac-addr",
        mac_text(link.gateway_mac),
        "--tcp-ports",
        "none",
        "--udp-ports",
        "none",
        "--no-map-gw",
        "--no-dhcp",
        "--no-ndp",
        "--no-dhcpv6",
        "--no-ra",
        "--no-icmp",
    ]
    if runas is not None:
        args += ["--runas", runas]
    return args


def start(link: Link, runtime_dir: Path, binary: str = "passt") -> Passt:
    path = shutil.which(binary)
    if path is None:
        raise EgressError(f"{binary}: not found; install Debian's passt (scripts/setup does)")
    private = runtime_dir / f"passt-{os.getpid()}-{os.urandom(6).hex()}"
    private.mkdir(mode=0o700)
    runas = None
    if os.geteuid() == 0:
        os.chown(private, PASST_UID, PASST_UID)
        runas = f"{PASST_UID}:{PASST_UID}"
    sock_path = private / "passt.sock"
    try:
        proc = subprocess.Popen(
            argv(path, link, sock_path, runas),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            sock = _connect(proc, sock_path)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return Passt(proc, sock)


def _connect(proc: subprocess.Popen[bytes], sock_path: Path) -> socket.socket:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            assert proc.stderr is not None
            said = _messages(proc.stderr.read(MAX_STDERR))
            raise EgressError(
                f"passt exited with {proc.returncode} at start: "
                f"{(said.splitlines() or ['no message'])[-1][:200]}"
            )
        if sock_path.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sock_path))
            except OSError:
                s.close()
            else:
                _check_peer(s, proc.pid)
                assert proc.stderr is not None
                os.set_blocking(proc.stderr.fileno(), False)
                return s
        if time.monotonic() > deadline:
            raise EgressError(f"passt did not open {sock_path} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.005)


def _check_peer(s: socket.socket, pid: int) -> None:
    creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer_pid, _uid, _gid = struct.unpack("3i", creds)
    if peer_pid != pid:
        s.close()
        raise EgressError(
            f"the socket passt opened is served by pid {peer_pid}, not by "
            f"passt ({pid}); refusing it"
        )
