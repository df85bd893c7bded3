#!/usr/bin/env python3
"""The hardware-KVM lane: run a command inside an L1 Linux that has real (nested) KVM.

QEMU's TCG emulates AMD SVM with nested paging, so Debian bookworm's own stock
kernel, booted with ``-cpu EPYC,+svm,+npt``, loads ``kvm_amd`` and offers a
``/dev/kvm`` that behaves like a hardware host's (AMD only: TCG has no VMX).
This machine's ``/`` is shared read-only over virtio-9p and mounted in L1 under
an overlay with a tmpfs upper layer, so the project's venv, its store and its
checkout run there unchanged; nothing L1 writes reaches the host except the
results directory, which is shared read-write.

    tools/hwkvm_lane.py ci                                   the lane .ci/run runs
    tools/hwkvm_lane.py run [--cwd DIR] [--results DIR] -- CMD...   exit code = CMD's

The kernel package is fetched with ``apt-get download`` (a package registry
this machine already uses) into ``$SPORE_LANE_CACHE`` (default
``~/.cache/spore-lane``) and reused. The L1 initramfs is busybox-static plus the
kernel's own modules, loaded in dependency order read from their ``.modinfo``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sporevm.build.initrd import CpioEntry, pack_cpio  # noqa: E402

PACKAGE = "linux-image-amd64"  # Debian's metapackage: the current bookworm kernel
# What L1 needs, leaves only: dependencies are added from each module's .modinfo.
MODULES = ("kvm-amd", "virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_net", "veth")
MEMORY_MIB = 3072
EXIT_MARK = "spore-lane-exit="


def cache_dir() -> Path:
    env = os.environ.get("SPORE_LANE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spore-lane"


def say(msg: str) -> None:
    print(f"lane: {msg}", file=sys.stderr, flush=True)


def fetch_kernel() -> Path:
    """Extract the stock kernel package once; return its root (boot/, lib/modules/)."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    dep = subprocess.run(
        ["apt-cache", "depends", PACKAGE], check=True, capture_output=True, text=True
    ).stdout
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*)", dep)
    if not m:
        raise SystemExit(f"lane: cannot tell which kernel {PACKAGE} depends on:\n{dep}")
    pkg = m.group(1)
    root = base / pkg
    if (root / "boot").is_dir():
        return root
    say(f"downloading {pkg} with apt-get download")
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        subprocess.run(
            ["apt-get", "download", "-q", pkg], cwd=tmp, check=True, stdout=subprocess.DEVNULL
        )
        debs = list(Path(tmp).glob("*.deb"))
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        os.rename(unpacked, root)
    return root


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def module_order(root: Path) -> list[Path]:
    """The modules MODULES need, each after its dependencies."""
    mods = {
        p.name.removesuffix(".ko").replace("-", "_"): p
        for p in (root / "lib" / "modules").rglob("*.ko")
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in mods:
            raise SystemExit(f"lane: module {name} is not in the kernel package")
        for d in _modinfo_depends(mods[key]):
            visit(d)
        order.append(mods[key])

    for name in MODULES:
        visit(name)
    return order


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
ip link set lo up  # the tests' registry listens on 127.0.0.1
hostname spore-lane
for m in $(cat /modules.order); do
  insmod "/modules/$m" 2>/dev/null || echo "lane: insmod $m failed" >&2
done
p9=trans=virtio,version=9p2000.L,msize=524288
mount -t 9p -o $p9,ro,cache=loose host /host || echo "lane: no host share" >&2
mount -t 9p -o $p9 results /results || echo "lane: no results share" >&2
mount -t tmpfs -o size=100% tmpfs /upper
mkdir -p /upper/up /upper/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/up,workdir=/upper/work /newroot
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys
# /tmp stays the overlay's (no tmpfs over it): a checkout under /tmp must stay visible
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/run && mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/lane-results && mount --bind /results /newroot/lane-results
# skopeo's blob-info cache (a bolt database): the host's copy, seen through 9p while
# the host writes it, read as corrupt in L1 ("invalid page type"); L1 keeps its own
mkdir -p /newroot/var/lib/containers/cache && mount -t tmpfs tmpfs /newroot/var/lib/containers/cache
cp /lane-cmd /newroot/tmp/lane-cmd
# QEMU's user-mode network (slirp): L1's way to the package mirror the apt test uses
if [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2
fi
npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)
echo "lane: L1 up in $(cut -d' ' -f1 /proc/uptime) s; kvm_amd npt=$npt" >&2
# switch_root, not chroot: in a chroot the kernel refuses new user namespaces (EPERM),
# which passt (the network tests' gateway) creates to sandbox itself
exec switch_root /newroot /bin/busybox sh -c \
  '/bin/sh /tmp/lane-cmd; echo "spore-lane-exit=$?"; sync; /bin/busybox poweroff -f'
"""


def build_initramfs(root: Path, cmd: list[str], cwd: str, env: dict[str, str], out: Path) -> None:
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG
    order = module_order(root)
    script = "set -e\n" + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    script += f"cd {shlex.quote(cwd)}\nset +e\nexec {shlex.join(cmd)}\n"
    entries = [
        CpioEntry(n, d)
        for n in ("bin", "dev", "proc", "sys", "host", "results", "upper", "newroot", "modules")
    ]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/busybox", f | 0o755, Path("/bin/busybox").read_bytes()),
        CpioEntry("init", f | 0o755, INIT.encode()),
        CpioEntry("lane-cmd", f | 0o644, script.encode()),
        CpioEntry("modules.order", f | 0o644, "".join(p.name + "\n" for p in order).encode()),
    ]
    entries += [CpioEntry(f"modules/{p.name}", f | 0o644, p.read_bytes()) for p in order]
    out.write_bytes(pack_cpio(entries))


def run(cmd: list[str], cwd: str, results: Path, env: dict[str, str], timeout: float) -> int:
    root = fetch_kernel()
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spore-lane-") as tmp:
        initrd = Path(tmp) / "initrd"
        build_initramfs(root, cmd, cwd, env, initrd)
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "EPYC,+svm,+npt",
            "-m",
            str(MEMORY_MIB),
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(vmlinuz),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off",
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={results},mount_tag=results,security_model=passthrough",
            # L1 reaches what this machine reaches, through QEMU's own sockets (no host
            # network configuration); the tests' guests stay behind their gateways.
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]
        say(f"booting L1 ({vmlinuz.name}, {MEMORY_MIB} MiB, TCG with SVM+NPT)")
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        code: int | None = None
        try:
            deadline = started + timeout
            for raw in proc.stdout:
                line = raw.decode(errors="replace").replace("\r", "")
                if line.startswith(EXIT_MARK):
                    code = int(line[len(EXIT_MARK) :].strip() or 1)
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if time.monotonic() > deadline:
                    say(f"timed out after {timeout:g} s")
                    break
        finally:
            proc.kill()
            proc.wait()
        say(f"L1 ran {time.monotonic() - started:.0f} s; command exit code {code}")
    return 1 if code is None else code


# The real-Linux subset run in L1 (jailed: Debian 12's kernel has Landlock ABI 2).
LANE_TESTS = (
    "tests/test_vm_e2e.py",
    "tests/test_spore_e2e.py::test_file_and_background_process_survive_restore",
    "tests/test_spore_e2e.py::test_forked_children_know_they_forked",
    "tests/test_spore_e2e.py::test_each_restore_of_one_spore_reads_fresh_random_bytes",
    "tests/test_spore_e2e.py::test_corrupt_chunk_fails_fast_in_one_line[eager-evicted]",
    "tests/test_spore_e2e.py::test_corrupt_chunk_fails_fast_in_one_line[lazy-immutable]",
    "tests/test_guest_loopback.py",
    "tests/test_smp.py",
    "tests/test_dist_e2e.py::test_round_trip[file]",  # the transports are not KVM's business
    "tests/test_dist_e2e.py::test_child_runs_after_pull",
    # Issue 16's acceptance: device, restore-strategy and dirty-tracking tests with
    # ioeventfd/irqfd on, on hardware KVM (probe guests: seconds each).
    "tests/test_kvm.py",
    "tests/test_probe_virtio.py",
    "tests/test_dirty_snapshots.py",
    "tests/test_restore_strategies.py",
    "tests/test_jail.py::test_denied_operations_fail_inside_the_jailed_monitor_and_the_vm_keeps_running",
    "tests/test_jail.py::test_monitors_the_launcher_starts_are_jailed_by_default",
    # virtio-net, the gateway and passt, inside namespaces L1 makes (the apt example
    # needs the mirror: run it by name, see docs/hardware-lane.md)
    "tests/test_network_e2e.py::test_no_network_means_only_lo",
    "tests/test_network_e2e.py::test_fresh_vm_under_policy",
    "tests/test_network_e2e.py::test_networked_spore_resumes_with_its_network",
    # the resident server: served runs, signals, hang-ups and refusals on hardware KVM
    "tests/test_server_e2e.py",
)


def prepare_kernel() -> None:
    """Build the ``kvm`` host-class kernel into the tests' kernel store, here on the host
    (a kernel build under nested TCG would take hours); L1 finds it through the overlay."""
    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "from tests.test_kernel import KERNEL_STORE\n"
        "from sporevm.build.kernel import ensure_kernel\n"
        "from sporevm.store import Store\n"
        "a = ensure_kernel(Store(KERNEL_STORE), 'kvm', lambda m: print('lane: kernel:', m))\n"
        "print('lane: kvm kernel', a.digest)\n"
    )
    subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c", code], cwd=repo, check=True)


def ci(results: Path, extra: list[str]) -> int:
    repo = Path(__file__).resolve().parents[1]
    started = time.monotonic()
    prepare_kernel()
    shutil.rmtree(results, ignore_errors=True)
    cmd = [
        ".venv/bin/pytest",
        "-p",
        "no:cacheprovider",
        "-v",
        "-ra",
        "--durations=5",
        "--junitxml=/lane-results/junit.xml",
        *(extra or LANE_TESTS),
    ]
    code = run(cmd, str(repo), results, {**_base_env(), "TERM": "dumb"}, timeout=40 * 60)
    say(
        f"hardware-KVM lane: exit {code}, {time.monotonic() - started:.0f} s in all "
        "(kvm_amd nested under QEMU TCG, Debian's stock kernel, jailed)"
    )
    return code


def _base_env() -> dict[str, str]:
    return {
        "HOME": str(Path.home()),
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--cwd", default=os.getcwd())
    r.add_argument("--results", default=str(cache_dir() / "results"))
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("-e", dest="env", action="append", default=[])
    r.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("fetch")
    c = sub.add_parser("ci")
    c.add_argument("--results", default=str(cache_dir() / "results"))
    c.add_argument("tests", nargs="*", help="pytest arguments instead of the lane's list")
    args = ap.parse_args()
    if args.cmd == "fetch":
        print(fetch_kernel())
        return 0
    if args.cmd == "ci":
        return ci(Path(args.results), args.tests)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    env = _base_env()
    env.update(kv.split("=", 1) for kv in args.env)
    return run(argv, args.cwd, Path(args.results), env, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
