"""`spore` command line: parse arguments, call one function per command, print results.

One module per family of commands (build_cmds, run_cmds, spore_cmds, cache_cmds), the
argument parser in parser.py, what they share in common.py.

Errors the user can cause are printed as one line (``spore: error: …``) with a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: the thin client's path imports no typing, re, enum
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["build_parser", "main", "os_error_line", "run_here"]


def __getattr__(name: str) -> Any:
    # Imported on use: `spore run` first asks the resident server (docs/server.md),
    # and when the server takes the run this process imports nothing else of spore.
    if name in ("build_parser", "_parser"):
        from sporevm.cli.parser import build_parser

        return build_parser
    if name == "os_error_line":
        from sporevm.cli.common import os_error_line

        return os_error_line
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from sporevm.cli import client

    if client.wanted(args):
        code = client.serve_remotely(args)
        if code is not None:
            return code
    return run_here(args)


def run_here(argv: Sequence[str]) -> int:
    """The command, run in this process (also the server's handler's entry)."""
    from sporevm.cli.common import one_line, os_error_line
    from sporevm.cli.parser import shared_parser
    from sporevm.errors import SporeError

    args = shared_parser().parse_args(argv)
    if getattr(args, "no_jail", False):
        os.environ["SPORE_NO_JAIL"] = "1"  # every monitor this process starts inherits it
    if os.environ.get("SPORE_NO_JAIL", "") not in ("", "0"):
        from sporevm.runtime.confine import warn_unjailed

        warn_unjailed("every VM monitor this command starts")
    try:
        code: int = args.func(args)
        return code
    except SporeError as exc:
        print(f"spore: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spore: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the host failed us (disk, permissions): one line, no traceback
        if os.environ.get("SPORE_TRACEBACK"):
            raise
        print(f"spore: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line; the traceback only on request
        if os.environ.get("SPORE_TRACEBACK"):
            raise
        print(
            f"spore: internal error: {type(exc).__name__}: {one_line(str(exc))}; this is a "
            "bug — run again with SPORE_TRACEBACK=1 and report what it prints",
            file=sys.stderr,
        )
        return 70
