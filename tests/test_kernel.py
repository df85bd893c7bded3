"""The managed guest kernel: host class, cmdline, cache key, patch sets, and (marked
``kernelbuild``) a real build from linux-source-6.1 booted under QEMU TCG.

The build is cached in ~/.cache/spore-tests/kernel-store across sessions (the
first one takes minutes). The reproducibility test builds a second time from a
clean staging dir; it runs only with SPORE_TEST_KERNEL_REPRO=1 (minutes more).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sporevm.build import kernel as K
from sporevm.build.filememo import file_identity, remember
from sporevm.store import Store, blake3_file

KERNEL_STORE = Path.home() / ".cache" / "spore-tests" / "kernel-store"

# -- fast unit tests -------------------------------------------------------------


def test_detect_host_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPORE_HOST_CLASS", raising=False)
    assert K.detect_host_class(tmp_path) == "kvm"
    (tmp_path / "kvm_pvm").mkdir()
    assert K.detect_host_class(tmp_path) == "kvm-pvm"
    monkeypatch.setenv("SPORE_HOST_CLASS", "kvm")
    assert K.detect_host_class(tmp_path) == "kvm"
    monkeypatch.setenv("SPORE_HOST_CLASS", "xen")
    with pytest.raises(K.KernelError, match="not a host class"):
        K.detect_host_class(tmp_path)


def test_detect_host_class_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPORE_HOST_CLASS", raising=False)
    expect = "kvm-pvm" if Path("/sys/module/kvm_pvm").is_dir() else "kvm"
    assert K.detect_host_class() == expect


def test_default_cmdline() -> None:
    kvm = K.default_cmdline("kvm").split()
    pvm = K.default_cmdline("kvm-pvm").split()
    for args in (kvm, pvm):
        for want in ("console=ttyS0", "quiet", "panic=-1", "reboot=k", "init=/init"):
            assert want in args
        assert not any(a.startswith("virtio_mmio.device=") for a in args)  # the VMM adds them
    assert not any(a.startswith("clearcpuid=") for a in kvm)
    (clear,) = [a for a in pvm if a.startswith("clearcpuid=")]
    value = clear.split("=", 1)[1]
    assert len(value) <= K.CLEARCPUID_MAX  # the kernel silently cuts the rest
    features = value.split(",")
    assert {"smap", "cx16", "erms", "fsrm", "xsave"} <= set(features)
    assert "rodata=off" in pvm
    assert "clocksource=kvm-clock" in pvm  # a TSC clocksource runs on while a spore sleeps
    with pytest.raises(K.KernelError, match="unknown host class"):
        K.default_cmdline("tcg")


def test_patch_series_files_exist_and_are_unified_diffs() -> None:
    common = K.patch_series("kvm")
    pvm = K.patch_series("kvm-pvm")
    assert common and pvm[: len(common)] == common and len(pvm) > len(common)
    for p in pvm:
        text = p.read_text()
        assert "\n--- a/" in text and "\n+++ b/" in text and "\n@@ " in text, p
    syscall_fix = pvm[-1].read_text()
    assert "arch/x86/mm/fault.c" in syscall_fix and "do_syscall_64" in syscall_fix


def test_cache_key_covers_every_input() -> None:
    base = {"host_class": "kvm", "gcc": "gcc 12.2.0", "patch:common/x": "aa"}
    key = K.cache_key(base)
    assert key == K.cache_key(dict(reversed(list(base.items()))))
    for name in base:
        assert K.cache_key({**base, name: base[name] + "x"}) != key
    assert K.cache_key({**base, "extra": ""}) != key
    # Length-prefixed: moving bytes between fields changes the key.
    assert K.cache_key({"a": "bc"}) != K.cache_key({"ab": "c"})


def test_config_mismatches() -> None:
    final = K.parse_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\n')
    assert final == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}
    frag = "CONFIG_A=y\n# CONFIG_B is not set\n# CONFIG_D is not set\nCONFIG_E=y\n"
    assert K.config_mismatches(final, frag) == ["CONFIG_E=y (got n)"]


def test_fragment_pins_what_the_issue_requires() -> None:
    frag = K.parse_config(K.fragment_bytes().decode())
    for sym in REQUIRED_ON:
        assert frag.get(sym) == "y", sym
    for sym in REQUIRED_OFF:
        assert frag.get(sym) == "n", sym
    assert frag.get("CONFIG_SMP") == "n"  # the base (and kvm-pvm) kernel is uniprocessor


def test_kvm_class_adds_smp_and_keeps_the_kvm_pvm_inputs_unchanged() -> None:
    kvm, pvm = K.parse_config(K.fragment_text("kvm")), K.parse_config(K.fragment_text("kvm-pvm"))
    assert kvm["CONFIG_SMP"] == "y" and kvm["CONFIG_NR_CPUS"] == "64"  # machine.vcpus: 1..64
    assert pvm == K.parse_config(K.fragment_bytes().decode()) and pvm["CONFIG_SMP"] == "n"
    assert K.class_fragments("kvm-pvm") == []
    assert [p.name for p in K.class_fragments("kvm")] == ["spore-6.1-kvm.config"]
    assert all(p.is_file() for p in K.class_fragments("kvm"))


@pytest.mark.skipif(not K.SOURCE_TARBALL.is_file(), reason="linux-source-6.1 not installed")
def test_class_fragment_is_a_build_input_of_its_class_only() -> None:
    kvm, pvm = K.build_inputs("kvm"), K.build_inputs("kvm-pvm")
    assert "fragment:spore-6.1-kvm.config" in kvm
    assert not any(k.startswith("fragment:") for k in pvm)  # kvm-pvm's key is as before


@pytest.mark.skipif(not K.SOURCE_TARBALL.is_file(), reason="linux-source-6.1 not installed")
def test_build_inputs_name_source_and_toolchain() -> None:
    inputs = K.build_inputs("kvm-pvm")
    assert inputs["source_package"].startswith("linux-source-6.1=6.1.")
    assert len(inputs["source_sha256"]) == 64
    assert inputs["gcc"].startswith("gcc") and "binutils" in inputs["binutils"].lower()
    assert any(k.startswith("patch:kvm-pvm/") for k in inputs)
    assert not any(k.startswith("patch:kvm-pvm/") for k in K.build_inputs("kvm"))


@pytest.mark.skipif(not K.SOURCE_TARBALL.is_file(), reason="linux-source-6.1 not installed")
def test_build_inputs_memoized_in_the_store_equal_a_fresh_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    fresh = K.build_inputs("kvm-pvm")
    assert K.build_inputs("kvm-pvm", store=store) == fresh

    def no_subprocess(*_a: object, **_k: object) -> None:
        raise AssertionError("a remembered tool version ran its tool again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert K.build_inputs("kvm-pvm", store=store) == fresh


def test_memo_recomputes_when_the_file_changes(tmp_path: Path) -> None:
    store, tool = Store(tmp_path / "store"), tmp_path / "tool"
    tool.write_text("v1")
    calls: list[str] = []

    def compute() -> str:
        calls.append(tool.read_text())
        return calls[-1]

    assert remember(store, "tool-version", file_identity(tool), compute) == "v1"
    assert remember(store, "tool-version", file_identity(tool), compute) == "v1"
    tool.write_text("v2!")  # another size and mtime: another identity
    assert remember(store, "tool-version", file_identity(tool), compute) == "v2!"
    assert calls == ["v1", "v2!"]


REQUIRED_ON = [
    "CONFIG_64BIT", "CONFIG_PRINTK", "CONFIG_TTY", "CONFIG_SERIAL_8250",
    "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
    "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE", "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_EXT4_FS",
    "CONFIG_OVERLAY_FS", "CONFIG_TMPFS", "CONFIG_TMPFS_XATTR", "CONFIG_VIRTIO_NET",
    "CONFIG_DEVTMPFS", "CONFIG_DEVTMPFS_MOUNT",
    "CONFIG_PROC_FS", "CONFIG_SYSFS", "CONFIG_BLK_DEV_INITRD", "CONFIG_BINFMT_ELF",
    "CONFIG_BINFMT_SCRIPT", "CONFIG_UNIX", "CONFIG_INET", "CONFIG_FUTEX", "CONFIG_EPOLL",
    "CONFIG_SIGNALFD", "CONFIG_TIMERFD", "CONFIG_EVENTFD", "CONFIG_SHMEM", "CONFIG_KVM_GUEST",
    "CONFIG_PARAVIRT", "CONFIG_PARAVIRT_CLOCK", "CONFIG_RANDOM_TRUST_BOOTLOADER",
    "CONFIG_UNWINDER_GUESS", "CONFIG_SLAB", "CONFIG_HZ_100", "CONFIG_NO_HZ_IDLE",
    "CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE",
]  # fmt: skip
REQUIRED_OFF = [
    "CONFIG_MODULES", "CONFIG_ACPI", "CONFIG_PCI", "CONFIG_RANDOMIZE_BASE",
    "CONFIG_CPU_MITIGATIONS", "CONFIG_RETPOLINE", "CONFIG_PAGE_TABLE_ISOLATION",
    "CONFIG_LEGACY_PTYS", "CONFIG_SLUB", "CONFIG_JUMP_LABEL", "CONFIG_STACKPROTECTOR",
    "CONFIG_VT", "CONFIG_INPUT", "CONFIG_SERIO", "CONFIG_DMI", "CONFIG_X86_MCE",
    "CONFIG_MICROCODE", "CONFIG_UNWINDER_ORC", "CONFIG_RD_GZIP", "CONFIG_RD_XZ",
    "CONFIG_RD_ZSTD", "CONFIG_RD_LZ4", "CONFIG_RD_BZIP2", "CONFIG_RD_LZMA", "CONFIG_RD_LZO",
]  # fmt: skip


# -- real build (kernelbuild) -------------------------------------------------------


@pytest.fixture(scope="session")
def built_kernel() -> K.KernelArtifact:
    if not K.SOURCE_TARBALL.is_file():
        pytest.skip("linux-source-6.1 not installed (scripts/setup --deps-only)")
    store = Store(KERNEL_STORE)
    t0 = time.monotonic()
    art = K.ensure_kernel(store, K.detect_host_class(), print)
    print(f"ensure_kernel: {time.monotonic() - t0:.1f} s, bzImage {art.path.stat().st_size} B")
    return art


@pytest.mark.kernelbuild
def test_final_config_has_the_fragment(built_kernel: K.KernelArtifact) -> None:
    final = K.parse_config(built_kernel.config_path.read_text())
    assert K.config_mismatches(final, K.fragment_text(built_kernel.host_class)) == []
    for sym in REQUIRED_ON:
        assert final.get(sym) == "y", sym
    for sym in REQUIRED_OFF:
        assert final.get(sym, "n") == "n", sym
    assert final.get("CONFIG_LOCALVERSION_AUTO", "n") == "n"
    # SMP on hardware KVM (machine.vcpus > 1), never on kvm-pvm (refused there)
    assert final.get("CONFIG_SMP", "n") == ("y" if built_kernel.host_class == "kvm" else "n")


@pytest.mark.kernelbuild
def test_cached_kernel_is_reused_and_verified(built_kernel: K.KernelArtifact) -> None:
    store = Store(KERNEL_STORE)
    t0 = time.monotonic()
    again = K.ensure_kernel(store, built_kernel.host_class)
    assert again == built_kernel
    assert time.monotonic() - t0 < 10  # key + re-hash only, no build
    assert blake3_file(again.path)[0] == again.digest
    assert again.path.read_bytes()[0x202:0x206] == b"HdrS"  # Linux boot protocol header
    assert again.vmlinux_path.read_bytes()[:4] == b"\x7fELF"
    assert again.cmdline == K.default_cmdline(again.host_class)


@pytest.mark.kernelbuild
@pytest.mark.skipif(
    os.environ.get("SPORE_TEST_KERNEL_REPRO") != "1",
    reason="second full kernel build; set SPORE_TEST_KERNEL_REPRO=1",
)
def test_rebuild_is_bit_identical(built_kernel: K.KernelArtifact, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")  # a clean staging dir at a different path
    again = K.ensure_kernel(store, built_kernel.host_class, print)
    assert again.digest == built_kernel.digest
    assert again.vmlinux_digest == built_kernel.vmlinux_digest


# -- QEMU TCG boot to /init ------------------------------------------------------

INIT_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>

static void check(const char *what, int ok) { printf("CHECK %s %s\n", what, ok ? "ok" : "FAIL"); }

/* Jump to entry_SYSCALL_64 from user mode with SYSCALL's register state: on any
 * CPU that is the fault kvm_pvm produces for a real SYSCALL. R11 asks for IOPL 3,
 * which the kernel must not grant; returns RAX and the RFLAGS seen afterwards. */
static long jump_syscall(unsigned long entry, long nr, long a1, long a2, long a3,
                         unsigned long *flags) {
    long ret;
    unsigned long fl;
    register long r10 asm("r10") = 0;
    asm volatile("lea 1f(%%rip), %%rcx\n\t"
                 "mov $0x3246, %%r11\n\t"
                 "jmp *%[entry]\n"
                 "1:\tpushfq\n\t"
                 "pop %[fl]"
                 : "=a"(ret), [fl] "=r"(fl)
                 : "a"(nr), "D"(a1), "S"(a2), "d"(a3), [entry] "r"(entry), "r"(r10)
                 : "rcx", "r11", "memory", "cc");
    *flags = fl;
    return ret;
}

static void jump_syscall_child(unsigned long entry) {
    static const char msg[] = "JUMP-SYSCALL-WRITE\n";
    unsigned long fl = 0;
    long pid = jump_syscall(entry, SYS_getpid, 0, 0, 0, &fl);
    long n = jump_syscall(entry, SYS_write, 1, (long)msg, sizeof msg - 1, &fl);
    _exit(pid == getpid() && n == (long)sizeof msg - 1 && !(fl & 0x3000) ? 0 : 3);
}

int main(void) {
    struct utsname u;
    char buf[64] = {0};
    int fd;
    pid_t pid;
    int st = -1;
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("SPORE-INIT-REACHED pid=%d\n", (int)getpid());
    check("uname", uname(&u) == 0);
    printf("UNAME %s %s\n", u.release, u.version);
    check("proc", mount("proc", "/proc", "proc", 0, NULL) == 0);
    check("devtmpfs", mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) == 0);
    check("tmpfs", mount("tmpfs", "/tmp", "tmpfs", 0, NULL) == 0);
    check("ext4", mount("/dev/vda", "/mnt", "ext4", MS_RDONLY, NULL) == 0);
    fd = open("/mnt/hello", O_RDONLY);
    check("read", fd >= 0 && read(fd, buf, sizeof buf - 1) > 0 && !strcmp(buf, "from-ext4\n"));
    mkdir("/tmp/up", 0755); mkdir("/tmp/work", 0755); mkdir("/tmp/root", 0755);
    check("overlay", mount("overlay", "/tmp/root", "overlay", 0,
        "lowerdir=/mnt,upperdir=/tmp/up,workdir=/tmp/work") == 0);
    check("hwrng", access("/dev/hwrng", F_OK) == 0);
    pid = fork();
    if (pid == 0) _exit(7);
    check("fork", pid > 0 && waitpid(pid, &st, 0) == pid && WEXITSTATUS(st) == 7);
    if (getenv("sporeentry")) {
        pid = fork();
        if (pid == 0) jump_syscall_child(strtoul(getenv("sporeentry"), NULL, 16));
        waitpid(pid, &st, 0);
        printf("JUMP-SYSCALL %s\n", WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "completed"
               : WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV ? "sigsegv" : "wrong");
    }
    printf("SPORE-INIT-DONE\n");
    reboot(RB_AUTOBOOT);
    return 1;
}
"""


def _newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A minimal uncompressed initramfs (cpio newc): (name, mode, data, rdev)."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(raw), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4))

    for i, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(i, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _run_qemu(argv: list[str], timeout: float) -> tuple[list[str], float]:
    """Run QEMU to exit; its output lines and the seconds until /init printed its marker."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    lines: list[str] = []
    to_init = -1.0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if to_init < 0 and "SPORE-INIT-REACHED" in line:
                to_init = time.monotonic() - t0
            lines.append(line)
        proc.wait()
    finally:
        killer.cancel()
        proc.kill()
    return lines, to_init


@pytest.mark.kernelbuild
def test_boots_to_init_under_qemu_tcg(built_kernel: K.KernelArtifact, tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or shutil.which("mke2fs") is None:
        pytest.skip("needs qemu-system-x86 and e2fsprogs (scripts/setup --deps-only)")
    (tmp_path / "init.c").write_text(INIT_C)
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-mno-red-zone",
            "-o",
            str(tmp_path / "init"),
            str(tmp_path / "init.c"),
        ],
        check=True,
    )
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(
        _newc(
            [(d, 0o40755, b"", 0) for d in ("dev", "proc", "tmp", "mnt")]
            + [("dev/console", 0o20600, b"", (5 << 8) | 1)]
            + [("init", 0o100755, (tmp_path / "init").read_bytes(), 0)]
        )
    )
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("from-ext4\n")
    disk = tmp_path / "disk.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(disk), "4M"], check=True)
    # The same kernel (and patch set) the host would use: the kvm-pvm patch must
    # be inert on a CPU without kvm_pvm's SYSCALL behaviour.
    cmdline = built_kernel.cmdline.replace(" quiet", "")
    nm = subprocess.run(["nm", str(built_kernel.vmlinux_path)], capture_output=True, text=True)
    (entry,) = [ln.split()[0] for ln in nm.stdout.splitlines() if ln.endswith(" entry_SYSCALL_64")]
    cmdline += f" sporeentry={entry}"  # unknown parameters reach init's environment
    argv = [
        qemu, "-M", "microvm,acpi=off", "-m", "256M", "-nographic", "-no-reboot",
        "-nodefaults", "-serial", "stdio", "-device", "i8042",  # reboot=k resets through it
        "-kernel", str(built_kernel.path), "-initrd", str(initrd), "-append", cmdline,
        "-drive", f"id=d0,file={disk},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=d0", "-device", "virtio-rng-device",
    ]  # fmt: skip
    t0 = time.monotonic()
    lines, to_init = _run_qemu(argv, timeout=120)
    took = time.monotonic() - t0
    log = "".join(lines)
    print(f"QEMU TCG: /init after {to_init:.2f} s, reset after {took:.2f} s\n{log[-3000:]}")
    assert "SPORE-INIT-REACHED pid=1" in log, log[-3000:]
    assert "SPORE-INIT-DONE" in log, log[-3000:]
    assert "FAIL" not in log, log[-3000:]
    assert K.LOCALVERSION in log and "#1 " in log  # pinned KBUILD_BUILD_VERSION, no host data
    # The kvm-pvm syscall fix, driven by the same fault signature on a normal CPU:
    # it completes the syscall (without granting IOPL); without the patch, SIGSEGV.
    if built_kernel.host_class == "kvm-pvm":
        assert "JUMP-SYSCALL-WRITE" in log and "JUMP-SYSCALL completed" in log, log[-3000:]
    else:
        assert "JUMP-SYSCALL sigsegv" in log, log[-3000:]


def test_damaged_store_entry_is_a_cache_miss(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    files = {"bzImage": b"kernel", "vmlinux": b"\x7fELF..", "config": b"CONFIG_64BIT=y\n"}
    staged = tmp_path / "staged"
    staged.mkdir()
    for name, data in files.items():
        (staged / name).write_bytes(data)
    digest, vdigest = blake3_file(staged / "bzImage")[0], blake3_file(staged / "vmlinux")[0]
    dest = K.kernel_dir(store, digest)
    dest.parent.mkdir(parents=True, exist_ok=True)  # a Store makes kernels/blake3 itself
    staged.rename(dest)
    record = {"digest": digest, "vmlinux_digest": vdigest}
    art = K._artifact(store, record, "kvm")
    assert art is not None and art.path == dest / "bzImage" and art.host_class == "kvm"
    assert K._artifact(store, {"digest": "blake3:zz", "vmlinux_digest": vdigest}, "kvm") is None
    (dest / "vmlinux").write_bytes(b"\x7fELF!!")  # changed after publishing
    assert K._artifact(store, record, "kvm") is None
    (dest / "vmlinux").unlink()
    assert K._artifact(store, record, "kvm") is None


def test_build_env_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("O", "/elsewhere"), ("KCFLAGS", "-g"), ("KBUILD_BUILD_USER", "me")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = K._env()
    assert "O" not in env and "KCFLAGS" not in env
    assert env["KBUILD_BUILD_USER"] == "spore" and env["KBUILD_BUILD_VERSION"] == "1"
    assert env["PATH"] == "/usr/bin:/bin"
