"""An unchanged build against starting the CLI: `spore build` vs `spore --version`.

One process run: builds the Sporefile once (so it is up to date), then alternates
``spore --version`` and ``spore build --json SPOREFILE`` ``--runs`` times each, and prints
the best and the median wall time of each and the ratio of the bests (issue goal: an
unchanged build costs at most 4x starting the CLI). Also prints which of the slow
imports the no-op build loaded (none of jsonschema, the VMM or the runtime should be).

Run: ``python bench/bench_noop_build.py [--runs 5] [SPOREFILE]``
(default examples/hello/Sporefile; the first build may take minutes: kernel, boot).
See docs/bench.md ("An unchanged build").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPORE = [sys.executable, "-m", "sporevm.cli"]
PROBE = (
    "import sys; from sporevm.cli import main; code = main(sys.argv[1:]); "
    "print(sorted({m.split('.')[0] if m.startswith('jsonschema') else '.'.join(m.split('.')[:2])"
    " for m in sys.modules if m.startswith(('jsonschema', 'sporevm.vmm', 'sporevm.runtime'))}))"
)


def timed(argv: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sporefile", nargs="?", default=str(ROOT / "examples/hello/Sporefile"))
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    subprocess.run(
        [*SPORE, "build", "--json", args.sporefile], check=True, stdout=subprocess.DEVNULL
    )
    version, noop = [], []
    for _ in range(args.runs):
        version.append(timed([*SPORE, "--version"]))
        noop.append(timed([*SPORE, "build", "--json", args.sporefile]))
    loaded = (
        subprocess.run(
            [sys.executable, "-c", PROBE, "build", "--json", args.sporefile],
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    load = os.getloadavg()[0]
    print(f"host load average (1 min): {load:.2f}")
    print(f"{'':24}{'best':>10}{'median':>10}")
    print(f"{'spore --version':24}{min(version):10.3f}{statistics.median(version):10.3f}")
    print(f"{'no-op spore build':24}{min(noop):10.3f}{statistics.median(noop):10.3f}")
    print(f"ratio of bests: {min(noop) / min(version):.2f}x   (goal <= 4x)")
    print(f"slow modules the no-op build loaded: {loaded}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
