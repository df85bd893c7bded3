"""doit's task-history file, written atomically and read forgivingly.

doit's own JSON backend truncates the file and rewrites it in place: a build
killed during that write leaves a torn file, and the next build then fails to
start ("Invalid JSON data"). The history is never a source of results (every
task decides up-to-dateness from the store), so a torn or unreadable file is
simply started afresh, and writes go through temp + fsync + rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doit.dependency import JsonDB

from sporevm.atomic import atomic_write

BACKEND = "spore-json"
PLUGIN = {"BACKEND": {BACKEND: "sporevm.build.doitstate:AtomicJsonDB"}}


class AtomicJsonDB(JsonDB):  # type: ignore[misc]
    def _load(self) -> dict[str, Any]:
        try:
            db: Any = self.codec.decode(Path(self.name).read_text())
        except (OSError, ValueError):
            return {}
        return db if isinstance(db, dict) else {}

    def dump(self) -> None:
        path = Path(self.name)
        # The store's tmp/ when the file lives in <store>/state/: prune sweeps it.
        tmp = path.parent.parent / "tmp"
        atomic_write(
            path, self.codec.encode(self._db).encode(), tmp_dir=tmp if tmp.is_dir() else None
        )
