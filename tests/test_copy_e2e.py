"""Copy-in and copy-out on a real Linux guest, as a CI job uses them (issue 17 acceptance).

One `spore build` (cold boot of the managed kernel, ~20 s on kvm_pvm; its step
names a `copy_out:` artifact, collected into out/), then two resumes of the spore:

1. the CI shape: a checkout (nested dirs, an executable script, a symlink, a file
   with a space in its name) copied in, the script run, its report copied out and
   the whole tree copied back and compared with the source; the run exits with the
   script's code (a failing one: reports must come back from failing jobs);
2. a hostile guest plants links to /etc and up the tree, a hardlink to
   /etc/passwd, a FIFO and a 2 GiB sparse file: the links come back as links, the
   FIFO and the sparse file are refused with one line each and exit code 74, and
   nothing is written outside the targets (no target, no temp dir for the refused).
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from tests.conftest import PushedImage
from tests.test_kernel import built_kernel  # noqa: F401  (shared fixture)
from tests.test_vm_e2e import busybox_rootfs, spore  # noqa: F401  (shared fixture)
from tests.treecmp import describe_tree

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

SPOREFILE = """\
sporefile: 1
name: ci
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
steps:
  - name: warm
    run: mkdir -p /root/art/sub && echo "warm {token}" > /root/warm.txt && cp /root/warm.txt /root/art/sub/
    copy_out: [{{src: /root/art, dst: artifacts}}]
"""  # noqa: E501 - the step's command reads best on one line

TEST_SH = """\
#!/bin/sh
# what a CI job does: read the checkout, write a report, fail
mkdir -p report
{ cat "docs/with space.txt"; cat src/lib/deep/value.txt; cat link/value.txt
  cat /root/warm.txt; ls src/lib; } > report/out.txt
exit 3
"""

HOSTILE = (
    "mkdir -p /h/links /h/fifo /h/big && "
    "ln -s /etc /h/links/etc && ln -s ../../../../../../tmp/planted /h/links/up && "
    "ln /etc/passwd /h/links/passwd && mkfifo /h/fifo/p && "
    "dd if=/dev/zero of=/h/big/sparse bs=1 count=0 seek=2G 2>/dev/null"
)


def facts(root: Path) -> dict[str, tuple[object, ...]]:
    """Type, mode, size and content of every entry (owners and times aside)."""
    return {k: v[:2] + v[4:6] for k, v in describe_tree(root, with_xattrs=False).items()}


def test_ci_flow_and_hostile_guest(
    busybox_image: PushedImage,
    busybox_rootfs: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    token = uuid.uuid4().hex  # fresh step keys: the kernel store is shared between runs
    (tmp_path / "Sporefile").write_text(SPOREFILE.format(layout=busybox_image.layout, token=token))
    proc = spore("build", str(tmp_path / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    spore_dir = tmp_path / "out" / "ci.spore"
    # the step's artifact, collected by the build into out/
    assert (tmp_path / "out" / "artifacts" / "sub" / "warm.txt").read_text() == f"warm {token}\n"

    repo = tmp_path / "repo"
    (repo / "src" / "lib" / "deep").mkdir(parents=True)
    (repo / "docs").mkdir()
    (repo / "test.sh").write_text(TEST_SH)
    (repo / "test.sh").chmod(0o755)
    (repo / "docs" / "with space.txt").write_text("spaced\n")
    (repo / "src" / "lib" / "deep" / "value.txt").write_text("deep\n")
    (repo / "src" / "lib" / "data.bin").write_bytes(os.urandom(300_000))
    (repo / "link").symlink_to("src/lib/deep")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    proc = spore(
        "run",
        "--from",
        str(spore_dir),
        "--copy-in",
        f"{repo}:/work",
        "-w",
        "/work",
        "--copy-out",
        f"/work/report:{jobs / 'report'}",
        "--copy-out",
        f"/work:{jobs / 'tree'}",
        "--",
        "sh",
        "-c",
        "./test.sh",
    )
    assert proc.returncode == 3, proc.stderr  # the script's code, reports copied anyway
    out = (jobs / "report" / "out.txt").read_text()
    assert out == f"spaced\ndeep\ndeep\nwarm {token}\ndata.bin\ndeep\n", out
    tree = facts(jobs / "tree")
    assert tree.pop("/report") and tree.pop("/report/out.txt")
    assert tree == facts(repo)
    assert os.readlink(jobs / "tree" / "link") == "src/lib/deep"
    assert stat.S_IMODE(os.stat(jobs / "tree" / "test.sh").st_mode) == 0o755

    host = tmp_path / "hostile"
    host.mkdir()
    (host / "sentinel").write_text("keep")
    proc = spore(
        "run",
        "-q",
        "--from",
        str(spore_dir),
        "--copy-out",
        f"/h/links:{host / 'links'}",
        "--copy-out",
        f"/h/fifo:{host / 'fifo'}",
        "--copy-out",
        f"/h/big:{host / 'big'}",
        "--",
        "sh",
        "-c",
        HOSTILE,
    )
    assert proc.returncode == 74, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("spore: error:")]
    assert len(errors) == 2, proc.stderr
    assert "FIFO" in errors[0] and "--copy-out-max-bytes" in errors[1], errors
    assert sorted(os.listdir(host)) == ["links", "sentinel"]  # no target, no temp dir
    assert (host / "sentinel").read_text() == "keep"
    assert os.readlink(host / "links" / "etc") == "/etc"
    assert os.readlink(host / "links" / "up") == "../../../../../../tmp/planted"
    passwd = host / "links" / "passwd"  # the guest's file, as a plain copy
    assert passwd.is_file() and not passwd.is_symlink() and "root" in passwd.read_text()
    assert not Path("/tmp/planted").exists()
