"""Build the probe guest (tests/probe/*.c, *.S) into a content-addressed cache directory.

The output path is ~/.cache/spore-tests/probe/<sha256>/probe.elf where the hash
covers every source file (name and bytes), the flags and the compiler's
version line, so an edit to any probe source rebuilds and nothing stale is
reused. The build writes into a temporary directory and renames it into place.
Every C and assembly file in tests/probe/ is linked: adding a test file (e.g.
a virtio driver part) needs no change here.

Run as ``python -m tests.probe_build`` to print the path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sporevm.vmm.bus import BusDevice

PROBE_DIR = Path(__file__).resolve().parent / "probe"
CACHE_ROOT = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spore-tests" / "probe"
)
CC = os.environ.get("CC", "gcc")
CFLAGS = [
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-mno-sse",
    "-mno-mmx",
    "-mno-avx",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-ident",
    "-ffile-prefix-map=.=.",
]
LDFLAGS = ["-Wl,--build-id=none", "-Wl,-T,probe.ld", "-Wl,-z,noexecstack", "-Wl,-n"]


def _sources() -> list[Path]:
    return sorted(
        p for p in PROBE_DIR.iterdir() if p.suffix in (".c", ".S", ".h", ".ld") and p.is_file()
    )


def probe_hash() -> str:
    h = hashlib.sha256(b"spore-probe-v2\0")
    version = subprocess.run([CC, "--version"], capture_output=True, text=True, check=True)
    h.update(version.stdout.splitlines()[0].encode() + b"\0")
    h.update("\0".join(CFLAGS + LDFLAGS).encode() + b"\0")
    for p in _sources():
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def build_probe(cache_root: Path = CACHE_ROOT) -> Path:
    """Return the path of probe.elf, building it if this source tree has no cached build."""
    out_dir = cache_root / probe_hash()
    elf = out_dir / "probe.elf"
    if elf.is_file():
        return elf
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".build-") as tmp:
        work = Path(tmp) / "src"
        shutil.copytree(PROBE_DIR, work)
        srcs = sorted(p.name for p in work.iterdir() if p.suffix in (".c", ".S"))
        # Compile to named objects first: linking sources directly would record gcc's
        # random temporary object names as symbols and break reproducibility.
        objs = [f"{name}.o" for name in srcs]
        cmds = [[CC, *CFLAGS, "-c", src, "-o", obj] for src, obj in zip(srcs, objs, strict=True)]
        cmds.append([CC, *CFLAGS, *LDFLAGS, "-o", "probe.elf", *objs])
        for cmd in cmds:
            r = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"probe build failed: {' '.join(cmd)}\n{r.stderr}")
        staged = Path(tmp) / "out"
        staged.mkdir()
        os.replace(work / "probe.elf", staged / "probe.elf")
        try:
            os.rename(staged, out_dir)
        except OSError:
            if not elf.is_file():  # lost a race only if the winner finished
                raise
    return elf


if __name__ == "__main__":
    print(build_probe())


# --- booting the probe (shared by the probe tests) ------------------------------------------

PROBE_TEST_PORT = 0x520
PROBE_TEST_PORT_LEN = 16
PROBE_MMIO_BASE = 0xD1000000  # above the virtio windows' first slots; the tests own it


class TestPort:
    """The probe's PIO test device (see tests/probe/probe.h)."""

    def __init__(self) -> None:
        self.value = 0
        self.fifo = bytearray()
        self.loop: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            return ((self.value ^ 0xA5A5A5A5) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if offset == 4:
            out = bytes(self.fifo[:size])
            del self.fifo[:size]
            return out.ljust(size, b"\0")
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.value = int.from_bytes(data, "little")
        elif offset == 4:
            self.fifo += data
        elif offset == 8:
            self.loop.append(int.from_bytes(data, "little"))


class MmioEcho:
    """Stores writes; reads return the stored bytes ^ 0x5a."""

    def __init__(self, size: int = 4096) -> None:
        self.mem = bytearray(size)
        self.accesses = 0

    def read(self, offset: int, size: int) -> bytes:
        self.accesses += 1
        return bytes(b ^ 0x5A for b in self.mem[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.accesses += 1
        self.mem[offset : offset + len(data)] = data


class ProbeVm:
    """A Machine with the probe loaded and its test devices attached; use as a context."""

    def __init__(
        self,
        tests: str,
        extra_cmdline: str = "",
        *,
        port_device: BusDevice | None = None,
        **machine_kwargs: Any,
    ) -> None:
        from sporevm.vmm.machine import Machine

        self.serial = bytearray()
        machine_kwargs.setdefault("strict_io", True)
        self.machine = Machine(
            machine_kwargs.pop("memory_bytes", 32 << 20),
            serial_output=self.serial.extend,
            **machine_kwargs,
        )
        self.port = TestPort()
        self.mmio = MmioEcho()
        self.machine.add_pio(PROBE_TEST_PORT, PROBE_TEST_PORT_LEN, port_device or self.port)
        self.machine.add_mmio(PROBE_MMIO_BASE, len(self.mmio.mem), self.mmio)
        cmdline = f"probe.tests={tests} probe.mmio={PROBE_MMIO_BASE:#x} {extra_cmdline}".strip()
        self.machine.load_kernel(build_probe().read_bytes(), cmdline)

    @property
    def output(self) -> str:
        return self.serial.decode(errors="replace")

    def __enter__(self) -> ProbeVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.machine.close()
