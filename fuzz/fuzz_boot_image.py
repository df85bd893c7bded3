"""Fuzz kernel image loading (boot.boot: bzImage setup header, ELF program headers).

The input is the whole image, as given with ``--kernel``. It is loaded into one
64 MiB GuestMemory (allocated once) with a short command line and a 4 KiB
initrd. Only BootError may escape; whatever loads must have its entry point,
kernel end and initrd inside guest RAM, above 1 MiB and not overlapping.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.vmm import boot
    from sporevm.vmm.memory import GuestMemory

RAM = 64 << 20
_mem = GuestMemory(RAM)
_INITRD = bytes(4096)
_SEED = bytes(boot.RNG_SEED_BYTES)


def TestOneInput(data: bytes) -> None:
    try:
        loaded = boot.boot(_mem, data, "console=ttyS0", _INITRD, rng_seed=_SEED)
    except boot.BootError:
        return
    assert loaded.kind == ("elf" if data[:4] == b"\x7fELF" else "bzimage")
    assert boot.KERNEL_LOAD_ADDR <= loaded.entry.rip < RAM
    assert boot.KERNEL_LOAD_ADDR <= loaded.kernel_end <= RAM
    assert loaded.initrd_addr is not None
    assert loaded.kernel_end <= loaded.initrd_addr <= RAM - len(_INITRD)
    assert loaded.initrd_addr % 4096 == 0


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
