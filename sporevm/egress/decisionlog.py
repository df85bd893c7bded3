"""The decision log: one JSON object per line, on a descriptor opened before the jail.

Every flow decision, DNS answer or refusal, and the first, tenth, hundredth … drop
of each kind. A guest can cause many lines (a new flow each time), so the log is
bounded: past ``MAX_LOG_BYTES`` one last line says so and the rest is counted, not
written. Lines are written whole with one ``write`` on an ``O_APPEND`` descriptor.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

MAX_LOG_BYTES = 64 << 20


class DecisionLog:
    def __init__(self, fd: int | None, limit: int = MAX_LOG_BYTES) -> None:
        self.fd = fd
        self.limit = limit
        self.written = 0
        self.suppressed = 0
        self.errors = 0

    @classmethod
    def open(cls, path: str | None) -> DecisionLog:
        if path is None:
            return cls(None)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return cls(fd)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.fd is None:
            return
        line = (
            json.dumps(
                {"ts": round(time.time(), 6), **event},
                separators=(",", ":"),
                sort_keys=False,
                ensure_ascii=True,
            ).encode()
            + b"\n"
        )
        if self.written + len(line) > self.limit:
            if self.suppressed == 0:
                self._write(
                    json.dumps(
                        {"ts": round(time.time(), 6), "event": "log-full", "limit": self.limit}
                    ).encode()
                    + b"\n"
                )
            self.suppressed += 1
            return
        self._write(line)

    def _write(self, line: bytes) -> None:
        assert self.fd is not None
        try:
            os.write(self.fd, line)
            self.written += len(line)
        except OSError:
            self.errors += 1  # a full disk must not stop the guest's allowed traffic

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
