"""The command line that starts one of spore's own Python processes (the VM monitor,
the monitor zygote, the egress gateway): an isolated interpreter on this one's
import path.

``python -m X`` first runs ``site``, which executes every ``.pth`` file of the
environment (an editable install's import hook among them): ~15 ms natively, but
~0.6 s where host code is emulated (the hardware-KVM lane), on every VM start.
``-I -S`` skips it, and ignores ``PYTHON*`` variables, the user site and the
working directory; the child is handed this process's ``sys.path`` instead, with
the directory spore's own package came from first, so it imports exactly the
spore and the dependencies its parent runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import sporevm


def import_path() -> list[str]:
    """Spore's package root, then this process's absolute sys.path entries, once each."""
    root = str(Path(sporevm.__file__).resolve().parent.parent)
    out = [root]
    for entry in sys.path:
        if entry and os.path.isabs(entry) and entry not in out:
            out.append(entry)
    return out


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m module args...``, isolated and without site (see above)."""
    path = import_path()
    code = (  # spore's root first; the rest after the interpreter's own (stdlib) entries
        f"import sys; p = {path!r}; sys.path[:0] = p[:1]; "
        "sys.path += [e for e in p[1:] if e not in sys.path]; import runpy; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    flags = ["-I", "-S"] + (["-B"] if sys.flags.dont_write_bytecode else [])
    return [sys.executable, *flags, "-c", code, *args]
