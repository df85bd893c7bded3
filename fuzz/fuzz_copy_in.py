"""Fuzz the guest agent's copy-in unpacker (guest/copyin.c) with hostile archives.

The C agent runs once, as an ordinary process (``init --serve-fd N --sandbox``,
as in tests/test_guest_agent.py), and every input is one COPY_IN of those bytes
into a fresh destination below a scratch directory, through the host's own
``CopyInStream``. The agent must answer every archive with DONE or one ERROR
(only CopyError may escape on the host), stay alive, and create nothing outside
the destination: a sibling directory that archives name through links,
``..`` and absolute paths stays empty. (The agent is C: libFuzzer sees no
coverage of it, so the seeds carry the structure; the property is what counts.)
"""

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build.initrd import copy_agent
    from sporevm.errors import CopyError
    from sporevm.runtime.agent_session import AgentSession, FdChannel
    from sporevm.runtime.copyio import CopyInStream
    from sporevm.store import Store

SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-copy-in-"))
OUTSIDE = SCRATCH / "outside"
OUTSIDE.mkdir()
_host, _guest = socket.socketpair()
_agent = copy_agent(Store(SCRATCH / "store"), SCRATCH / "init")
_proc = subprocess.Popen(
    [str(_agent), "--serve-fd", str(_guest.fileno()), "--sandbox", "--run-dir", str(SCRATCH)],
    pass_fds=[_guest.fileno()],
)
_guest.close()
SESSION = AgentSession(FdChannel(_host.fileno()), grace=5)
SESSION.wait_ready(30)
_count = [0]


@atexit.register
def _stop() -> None:
    _proc.kill()
    _proc.wait()
    shutil.rmtree(SCRATCH, ignore_errors=True)


def TestOneInput(data: bytes) -> None:
    _count[0] += 1
    work = SCRATCH / "w"
    dest = work / "dest"
    stream = CopyInStream(SESSION, str(dest), stall=10)
    try:
        stream.write(data)
        stream.finish(10)
    except CopyError:
        pass
    assert _proc.poll() is None, "the agent died"
    assert os.listdir(OUTSIDE) == [], os.listdir(OUTSIDE)
    assert sorted(os.listdir(SCRATCH)) <= sorted(["init", "outside", "store", "w"])
    if work.exists():
        assert sorted(os.listdir(work)) in ([], ["dest"])
        shutil.rmtree(work)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
