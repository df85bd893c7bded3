"""Fuzz the RAM image offer a server reads from its handler (sporevm/runtime/ramimage.py):
``decode_offer`` on the message, and ``receive_offer`` on a real SOCK_SEQPACKET pair
with no descriptor, an unsealed memfd, or two (picked by the input's last byte).

Only RamImageError may escape ``decode_offer``; what decodes is in range and encodes
back to the same bytes. ``receive_offer`` never raises, keeps nothing (no offer here
carries a sealed image) and leaves no descriptor open.
"""

import os
import socket
import sys

import atheris

with atheris.instrument_imports():
    from sporevm.runtime import ramimage


CACHE = ramimage.RamImageCache(1 << 30)


def TestOneInput(data: bytes) -> None:
    try:
        iid, size = ramimage.decode_offer(data)
    except ramimage.RamImageError:
        pass
    else:
        assert iid.startswith("blake3:") and len(iid) == 71
        assert 0 < size <= 3 << 30 and size % (2 << 20) == 0
        assert ramimage.encode_offer(iid, size) == data
    if not data:
        return
    before = len(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        fds = []
        for _ in range(data[-1] % 3):
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, 2 << 20)
            fds.append(fd)
        try:
            socket.send_fds(theirs, [data[:-1] or b"x"], fds)
        finally:
            for fd in fds:
                os.close(fd)
        said = ramimage.receive_offer(ours, CACHE)
        assert said is not None and said.startswith("dropped an offer"), said
    assert CACHE.stats() == (0, 0)
    assert len(os.listdir("/proc/self/fd")) == before


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
