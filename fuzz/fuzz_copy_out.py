"""Fuzz the host's copy-out path: a hostile guest's archive and the frames carrying it.

The first input byte picks the route: even - the rest is a tar stream handed
to ``copy_extract.extract`` directly; odd - the rest is what the guest sends
on the agent channel (frames, cut every ``data[0] // 2 + 1`` bytes) and is read
through a ``CopyOutStream`` on stream 1 into the extractor, as `spore run` does;
then the guest hangs up, so no outcome depends on a clock.
Only SporeError may escape (CopyError, or AgentProtocolError / timeout for a
broken channel); nothing may appear beside the target; a failed copy leaves no
target and no temp directory; a successful one holds only directories, regular
files and symlinks, none setuid/setgid/sticky, within the bounds.
"""

import io
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build.copy_extract import Bounds, extract
    from sporevm.errors import SporeError
    from sporevm.runtime.agent_session import AgentSession, QueueChannel
    from sporevm.runtime.copyio import CopyOutStream

BOUNDS = Bounds(max_bytes=1 << 20, max_entries=64)


def _check_tree(out: Path) -> None:
    entries = size = 0
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
            assert not st.st_mode & 0o7000
            entries += 1
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
    assert entries <= BOUNDS.max_entries
    assert size <= BOUNDS.max_bytes * BOUNDS.max_entries  # hardlinks may repeat a file


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    box = Path(tempfile.mkdtemp(prefix="fuzz-copy-out-"))
    try:
        (box / "sentinel").write_bytes(b"keep")
        body = data[1:]
        if data[0] % 2 == 0:
            source: io.BytesIO | CopyOutStream = io.BytesIO(body)
        else:
            channel = QueueChannel(len)
            session = AgentSession(channel, grace=0)
            source = CopyOutStream(
                session,
                "/g",
                BOUNDS.max_bytes,
                BOUNDS.max_entries,
                BOUNDS.stream_limit(),
                idle=5.0,
            )
            step = data[0] // 2 + 1
            for i in range(0, len(body), step):
                channel.feed(body[i : i + step])
            # Then the guest hangs up: the copy ends on the channel, never on a clock
            # (a 1 ms idle timeout made a unit's outcome depend on host load).
            channel.feed(b"")
        try:
            extract(source, box / "out", BOUNDS, "fuzz")
        except SporeError:
            assert sorted(os.listdir(box)) == ["sentinel"]
        else:
            assert sorted(os.listdir(box)) == ["out", "sentinel"]
            _check_tree(box / "out")
        assert (box / "sentinel").read_bytes() == b"keep"
    finally:
        for dirpath, dirnames, _ in os.walk(box):
            for d in dirnames:  # a restrictive mode must not stop the cleanup
                if not os.path.islink(os.path.join(dirpath, d)):
                    os.chmod(os.path.join(dirpath, d), 0o700)
        shutil.rmtree(box)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
