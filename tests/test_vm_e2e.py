"""Real Linux in our VMM, end to end, as a user runs it: `spore run` and `spore build` with steps.

Each test boots the managed kernel (~20 s on kvm_pvm, where guest kernel code
is emulated), so there are few, and each guest command is a single process
(see the note on multi-process pipelines in docs/vmm.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import PushedImage
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]


def spore(
    *args: str, cwd: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    # The kernel store is shared with test_kernel.py so the kernel is built once.
    env = {**os.environ, "SPORE_HOME": str(KERNEL_STORE)}
    return subprocess.run(
        [sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def busybox_rootfs(
    request: pytest.FixtureRequest,
    busybox_image: PushedImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    request.getfixturevalue("built_kernel")  # builds the managed kernel once (minutes)
    out = tmp_path_factory.mktemp("vm") / "busybox.ext4"
    proc = spore("rootfs", f"oci-layout:{busybox_image.layout}:latest", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_run_streams_output_and_returns_exit_code(busybox_rootfs: Path) -> None:
    proc = spore(
        "run",
        "-q",
        "--rootfs",
        str(busybox_rootfs),
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo hi; echo "$GREETING"; pwd; echo oops >&2; exit 7',
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "hi\nhi there\n/tmp\n"
    assert "oops" in proc.stderr


SPOREFILE = """\
sporefile: 1
name: twostep
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
env: {{WHO: "{who}"}}
steps:
  - name: write
    run: echo "hello $WHO" > /tmp/greeting
  - name: check
    run: {check}
"""


def test_build_runs_steps_then_caches_and_fails_clearly(
    busybox_image: PushedImage, busybox_rootfs: Path, tmp_path: Path
) -> None:
    # A fresh value in the steps' env gives fresh step keys: the kernel store is shared
    # between runs, and a recorded chain would (correctly) start no VM at all.
    who = "spore-" + uuid.uuid4().hex[:8]
    good = tmp_path / "good"
    good.mkdir()
    (good / "Sporefile").write_text(
        SPOREFILE.format(layout=busybox_image.layout, who=who, check="[cat, /tmp/greeting]")
    )
    proc = spore("build", str(good / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    assert f"check | hello {who}" in proc.stderr  # step output streamed, in order
    assert proc.stderr.index("step:write") < proc.stderr.index("step:check")
    again = spore("build", "--json", str(good / "Sporefile"))
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert set(doc["tasks"].values()) == {"up-to-date"}  # no VM started
    spore_dir = Path(doc["spore"])

    # The sealed spore resumes warm: what step "write" left in tmpfs is still there.
    resumed = spore("run", "-q", "--from", str(spore_dir), "--", "cat", "/tmp/greeting")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"hello {who}\n"

    # Forked children share the chunks and know they forked.
    forks = spore(
        "fork", str(spore_dir), "--count", "2", "--out", str(tmp_path / "forks"), "--json"
    )
    assert forks.returncode == 0, forks.stderr
    children = json.loads(forks.stdout)["children"]
    seen = []
    for child in children:
        gen = spore("run", "-q", "--from", child["path"], "--", "cat", "/run/spore/generation.json")
        assert gen.returncode == 0, gen.stderr
        info = json.loads(gen.stdout)
        assert info["generation"] == child["generation"] and info["index"] == child["index"]
        assert info["parent"] == json.loads(forks.stdout)["parent"] and info["count"] == 2
        seen.append(info["generation"])
    assert len(set(seen)) == 2

    # Changing the last step resumes the snapshot taken after the first: no cold boot.
    (good / "Sporefile").write_text(
        SPOREFILE.format(
            layout=busybox_image.layout, who=who, check="[cat, /tmp/greeting, /proc/version]"
        )
    )
    inc = spore("build", str(good / "Sporefile"))
    assert inc.returncode == 0, inc.stderr
    assert "resuming from the snapshot after step write (1 of 2 steps cached)" in inc.stderr
    assert f"check | hello {who}" in inc.stderr and "step:write" not in inc.stderr

    # A corrupted chunk fails the restore before any VM runs, with the chunk named.
    mdoc = json.loads((spore_dir / "manifest.json").read_bytes())
    chunk = next(c for c in mdoc["memory"]["chunks"] if c)
    chunk_file = KERNEL_STORE / "chunks" / "blake3" / chunk.split(":", 1)[1]
    original = chunk_file.read_bytes()
    try:
        chunk_file.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
        bad_run = spore("run", "-q", "--from", str(spore_dir), "--", "true")
        assert bad_run.returncode != 0
        assert chunk.split(":", 1)[1][:12] in bad_run.stderr, bad_run.stderr
    finally:
        chunk_file.write_bytes(original)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Sporefile").write_text(
        SPOREFILE.format(
            layout=busybox_image.layout, who=who, check="'echo about to fail >&2; exit 3'"
        )
    )
    proc = spore("build", str(bad / "Sporefile"))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    failure = [line for line in err if line.startswith("spore: error:")]
    assert failure and "step check failed: exited with code 3" in failure[0]
    assert "nothing was published" in failure[0]
    assert "| about to fail" in proc.stderr
