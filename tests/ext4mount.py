"""Mount an ext4 image read-only through a loop device, for tests that read it back."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mounted_ro(image: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spore-mnt-") as mnt:
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "ro,loop,noload", str(image), mnt],
            check=True,
            capture_output=True,
        )
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)
