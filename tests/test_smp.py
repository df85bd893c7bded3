"""SMP guests (issue 12): ``vcpus: N`` gives the guest N CPUs, or is refused in one line.

On hardware KVM (host class ``kvm``) the managed kernel has SMP and the VMM writes
an MP table, so N vCPUs are N CPUs in the guest: through a build (steps pinned to
each CPU, so both write guest RAM between step snapshots), a ``verify:`` restore,
``spore run --from`` with every restore strategy, and the children of ``spore
fork``. This host class is kvm_pvm, which refuses N > 1 before any VM starts; the
SMP tests run in the hardware-KVM lane:

    .venv/bin/python -c "import sys; sys.path.insert(0,'tools'); import hwkvm_lane; \\
        hwkvm_lane.prepare_kernel()"          # the kvm kernel, built here, once
    .venv/bin/python tools/hwkvm_lane.py run -- .venv/bin/pytest -q tests/test_smp.py
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from sporevm.build import kernel as K
from sporevm.build.kernel import detect_host_class
from sporevm.store import Store
from tests.conftest import PushedImage
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)
from tests.test_vm_e2e import busybox_rootfs, spore  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

HOST_CLASS = detect_host_class()
needs_kvm = pytest.mark.skipif(
    HOST_CLASS != "kvm",
    reason=f"SMP guests need hardware KVM (host class kvm); this host is {HOST_CLASS}, which "
    "refuses vcpus > 1. Run it in the hardware-KVM lane: tools/hwkvm_lane.py run -- "
    ".venv/bin/pytest -q tests/test_smp.py",
)
needs_pvm = pytest.mark.skipif(
    HOST_CLASS != "kvm-pvm",
    reason=f"the refusal is kvm-pvm's; this host is {HOST_CLASS}, which gives SMP guests",
)

# The token (fresh per run) gives fresh step keys: the kernel store is shared between runs.
SPOREFILE = """\
sporefile: 1
name: smp
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB, vcpus: {vcpus}}}
env: {{TOKEN: "{token}"}}
steps:
  - name: cpu0
    run: taskset -c 0 sh -c 'echo "cpu0 $TOKEN" > /tmp/cpu0'
  - name: cpu1
    run: taskset -c 1 sh -c 'echo "cpu1 $TOKEN" > /tmp/cpu1' && nproc
verify:
  - run: [nproc]
"""

# CPUs online (nproc counts the caller's affinity: never under taskset); what each CPU
# wrote during the build; the CPU a task pinned to CPU 1 ran on (field 39 of
# /proc/self/stat): vCPU 1 runs guest code after the restore.
CHECK = "nproc; cat /tmp/cpu0 /tmp/cpu1; taskset -c 1 awk '{print $39}' /proc/self/stat"


@needs_kvm
def test_two_vcpus_through_build_snapshot_restore_and_fork(
    busybox_image: PushedImage,
    tmp_path: Path,
) -> None:
    token = uuid.uuid4().hex
    (tmp_path / "Sporefile").write_text(
        SPOREFILE.format(layout=busybox_image.layout, vcpus=2, token=token)
    )
    t0 = time.monotonic()
    proc = spore("build", str(tmp_path / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    assert "cpu1 | 2\n" in proc.stderr  # the cold-booted guest has both CPUs
    assert "verify[0] | 2\n" in proc.stderr  # and so does a fresh restore of the spore
    spore_dir = tmp_path / "out" / "smp.spore"
    doc = json.loads(spore("inspect", "--json", str(spore_dir)).stdout)
    assert doc["manifest"]["platform"]["vcpus"] == 2
    expected = f"2\ncpu0 {token}\ncpu1 {token}\n1\n"

    for strategy in ("eager", "lazy", "local"):  # lazy: both vCPUs fault RAM in at once
        resumed = spore(
            "run",
            "-q",
            "--timeout",
            "60s",
            "--restore",
            strategy,
            "--from",
            str(spore_dir),
            "--",
            "sh",
            "-c",
            CHECK,
        )
        assert resumed.returncode == 0, (strategy, resumed.stderr)
        assert resumed.stdout == expected, strategy

    forks = spore(
        "fork", str(spore_dir), "--count", "2", "--out", str(tmp_path / "forks"), "--json"
    )
    assert forks.returncode == 0, forks.stderr
    children = json.loads(forks.stdout)["children"]
    generations = set()
    for child in children:
        run = spore(
            "run",
            "-q",
            "--timeout",
            "60s",
            "--from",
            child["path"],
            "--",
            "sh",
            "-c",
            CHECK + "; cat /run/spore/generation.json",
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(expected), run.stdout
        generations.add(json.loads(run.stdout[len(expected) :])["generation"])
    assert len(generations) == 2
    print(f"SMP build + restore + 2 forks: {time.monotonic() - t0:.1f} s")


@needs_kvm
def test_run_boots_three_vcpus(busybox_rootfs: Path) -> None:  # noqa: F811
    proc = spore(
        "run",
        "-q",
        "--timeout",
        "60s",
        "--rootfs",
        str(busybox_rootfs),
        "--vcpus",
        "3",
        "--",
        "sh",
        "-c",
        "nproc; taskset -c 2 awk '{print $39}' /proc/self/stat",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3\n2\n"


@needs_kvm
def test_a_kernel_without_smp_fails_clearly_instead_of_running_on_one_cpu(
    busybox_rootfs: Path,  # noqa: F811
) -> None:
    # The kvm-pvm kernel is uniprocessor and boots on hardware KVM too: as a --kernel it
    # stands for any user kernel built without CONFIG_SMP.
    store = Store(KERNEL_STORE)
    up = K.cached_kernel(store, K.cache_key(K.build_inputs("kvm-pvm", store=store)), "kvm-pvm")
    if up is None:
        pytest.skip("no kvm-pvm (uniprocessor) kernel in the tests' kernel store")
    proc = spore(
        "run",
        "-q",
        "--kernel",
        str(up.path),
        "--rootfs",
        str(busybox_rootfs),
        "--vcpus",
        "2",
        "--",
        "nproc",
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr == (
        "spore: error: the guest kernel brought up 1 of the 2 vCPUs (--vcpus 2): it lacks SMP "
        "or could not start them; use a kernel with CONFIG_SMP (the managed one has it) or "
        "1 vCPU\n"
    )


@needs_pvm
def test_run_refuses_more_vcpus_than_the_host_class_gives(
    busybox_image: PushedImage,
) -> None:
    t0 = time.monotonic()
    proc = spore(
        "run", "--image", f"oci-layout:{busybox_image.layout}:latest", "--vcpus", "2", "--", "nproc"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        "spore: error: --vcpus 2 needs SMP, which host class kvm-pvm does not support; use 1\n"
    )
    assert time.monotonic() - t0 < 10  # refused up front: no rootfs, no kernel, no VM


@needs_pvm
def test_build_refuses_machine_vcpus_above_one(
    busybox_image: PushedImage,
    tmp_path: Path,
) -> None:
    (tmp_path / "Sporefile").write_text(
        SPOREFILE.format(layout=busybox_image.layout, vcpus=4, token=uuid.uuid4().hex)
    )
    proc = spore("build", str(tmp_path / "Sporefile"))
    assert proc.returncode == 2, proc.stderr
    line = "machine.vcpus: 4 needs SMP, which host class kvm-pvm does not support; use 1"
    assert f"spore: error: {line}\n" in proc.stderr
    assert "step:cpu0" not in proc.stderr  # no VM, no step ran
    assert not (tmp_path / "out").exists()
