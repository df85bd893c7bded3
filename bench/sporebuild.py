"""`spore build --json SPOREFILE` for the benches: the sealed spore's path, or exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_spore_from(sporefile: Path, timeout: float) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "sporevm.cli", "build", "--json", str(sporefile)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"spore build failed: {proc.stderr.strip()[-800:]}")
    return Path(json.loads(proc.stdout)["spore"])
