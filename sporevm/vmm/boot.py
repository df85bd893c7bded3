"""The Linux x86 boot protocol, 64-bit entry, for a bzImage or an ELF (vmlinux or the probe).

We skip real mode and the kernel's setup code entirely: the VMM fills in
boot_params (the "zero page") itself, builds identity-mapped page tables and a
boot GDT, and enters the kernel's 64-bit entry point with paging on and
RSI = boot_params (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").

Low-memory layout (all below 1 MiB; see docs/vmm.md):

  0x0500  boot GDT (null, null, code 0x10, data 0x18, TSS 0x20)
  0x0580  64-bit TSS (0x68 bytes, no I/O bitmap)
  0x1000…0x5000  boot stack (RSP = 0x5000)
  0x5000  setup_data chain (RNG seed)
  0x7000  boot_params
  0x9000  PML4, 0xA000 PDPT, 0xB000…0xEFFF four page directories (2 MiB pages, 0–4 GiB)
  0x20000 kernel command line (≤ 64 KiB)
  0x100000  kernel (bzImage protected-mode part, at +0x200 its startup_64) or ELF segments
  top of RAM  initrd
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from sporevm.errors import SporeError
from sporevm.vmm.cpu import LongModeEntry
from sporevm.vmm.memory import GuestMemory


class BootError(SporeError):
    """The kernel image, initrd or command line cannot be booted."""


GDT_ADDR = 0x0500
TSS_ADDR = 0x0580
TSS_LIMIT = 0x67
BOOT_STACK_TOP = 0x5000
SETUP_DATA_ADDR = 0x5000
BOOT_PARAMS_ADDR = 0x7000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_LOAD_ADDR = 0x100000
EBDA_START = 0x9FC00
BIOS_START, BIOS_END = 0xF0000, 0x100000
MAPPED_GIB = 4

CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR = 0x10, 0x18, 0x20

E820_RAM, E820_RESERVED = 1, 2
E820_MAX = 128
SETUP_RNG_SEED = 9
RNG_SEED_BYTES = 32

# boot_params offsets (arch/x86/include/uapi/asm/bootparam.h).
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_HDR = 0x1F1
BP_BOOT_FLAG = 0x1FE
BP_JUMP = 0x200
BP_HEADER = 0x202
BP_VERSION = 0x206
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_HEAP_END_PTR = 0x224
BP_CMD_LINE_PTR = 0x228
BP_INITRD_ADDR_MAX = 0x22C
BP_KERNEL_ALIGNMENT = 0x230
BP_XLOADFLAGS = 0x236
BP_CMDLINE_SIZE = 0x238
BP_SETUP_DATA = 0x250
BP_PREF_ADDRESS = 0x258
BP_INIT_SIZE = 0x260
BP_E820_TABLE = 0x2D0
BOOT_PARAMS_SIZE = 0x1000
HDR_END_MAX = 0x290  # the setup header never reaches past edd_mbr_sig_buffer

LOADED_HIGH, CAN_USE_HEAP = 0x01, 0x80
XLF_KERNEL_64 = 0x01
MIN_VERSION_64BIT = 0x020C  # 2.12: xloadflags (XLF_KERNEL_64) exist


@dataclass(frozen=True)
class LoadedKernel:
    kind: str  # "bzimage" or "elf"
    entry: LongModeEntry
    kernel_end: int  # first byte above everything the kernel may use while booting
    initrd_addr: int | None


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: low RAM, EBDA + BIOS holes, RAM above 1 MiB."""
    if ram_size < 2 * 1024 * 1024:
        raise BootError(f"guest RAM {ram_size:#x} is below the 2 MiB minimum")
    return [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        (BIOS_START, BIOS_END - BIOS_START, E820_RESERVED),
        (KERNEL_LOAD_ADDR, ram_size - KERNEL_LOAD_ADDR, E820_RAM),
    ]


def boot(
    mem: GuestMemory,
    image: bytes,
    cmdline: str,
    initrd: bytes | None = None,
    *,
    rng_seed: bytes | None = None,
) -> LoadedKernel:
    """Load ``image`` (bzImage or ELF), write boot_params and page tables; return the entry."""
    bp = bytearray(BOOT_PARAMS_SIZE)
    if image[:4] == b"\x7fELF":
        kind = "elf"
        rip, kernel_end = _load_elf(mem, image)
        _synth_header(bp)
    else:
        kind = "bzimage"
        rip, kernel_end = _load_bzimage(mem, image, bp)
    _put_cmdline(mem, bp, cmdline)
    initrd_addr = _put_initrd(mem, bp, initrd, kernel_end) if initrd is not None else None
    _put_e820(bp, e820_map(mem.size))
    seed = os.urandom(RNG_SEED_BYTES) if rng_seed is None else rng_seed
    _put_setup_data(mem, bp, seed)
    bp[BP_TYPE_OF_LOADER] = 0xFF  # "undefined" boot loader id
    bp[BP_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, BP_HEAP_END_PTR, 0xFE00 - 0x200)
    mem.write(BOOT_PARAMS_ADDR, bytes(bp))
    _put_gdt_tss(mem)
    _put_page_tables(mem)
    entry = LongModeEntry(
        rip=rip,
        rsi=BOOT_PARAMS_ADDR,
        cr3=PML4_ADDR,
        gdt_base=GDT_ADDR,
        gdt_limit=6 * 8 - 1,
        code_selector=CODE_SELECTOR,
        data_selector=DATA_SELECTOR,
        tss_selector=TSS_SELECTOR,
        tss_base=TSS_ADDR,
        tss_limit=TSS_LIMIT,
        rsp=BOOT_STACK_TOP,
    )
    return LoadedKernel(kind, entry, kernel_end, initrd_addr)


# --- images ------------------------------------------------------------------------------


def _load_bzimage(mem: GuestMemory, image: bytes, bp: bytearray) -> tuple[int, int]:
    if len(image) < 0x1000:
        raise BootError(f"kernel image is {len(image)} bytes: too short for a bzImage or ELF")
    if image[BP_HEADER : BP_HEADER + 4] != b"HdrS":
        raise BootError("kernel image is neither ELF nor a bzImage (no 'HdrS' magic at 0x202)")
    if struct.unpack_from("<H", image, BP_BOOT_FLAG)[0] != 0xAA55:
        raise BootError("bzImage boot_flag at 0x1fe is not 0xAA55")
    version = struct.unpack_from("<H", image, BP_VERSION)[0]
    if version < MIN_VERSION_64BIT:
        raise BootError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.12; "
            "the 64-bit entry point needs 2.12 or later"
        )
    if not struct.unpack_from("<H", image, BP_XLOADFLAGS)[0] & XLF_KERNEL_64:
        raise BootError("bzImage lacks XLF_KERNEL_64: it has no 64-bit entry point")
    hdr_end = BP_HEADER + image[BP_JUMP + 1]
    if hdr_end > HDR_END_MAX:
        raise BootError(f"bzImage setup header claims to end at {hdr_end:#x} (> {HDR_END_MAX:#x})")
    bp[BP_HDR:hdr_end] = image[BP_HDR:hdr_end]
    setup_sects = image[BP_HDR] or 4  # 0 means 4, for ancient images
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= len(image):
        raise BootError(f"bzImage setup_sects={setup_sects} points past the end of the image")
    kernel = image[pm_offset:]
    pref = struct.unpack_from("<Q", image, BP_PREF_ADDRESS)[0]
    init_size = struct.unpack_from("<I", image, BP_INIT_SIZE)[0]
    kernel_end = max(KERNEL_LOAD_ADDR + len(kernel), pref + init_size)
    if kernel_end > mem.size:
        raise BootError(
            f"kernel needs guest RAM up to {kernel_end:#x} while decompressing; "
            f"the VM has {mem.size:#x}: give it more memory"
        )
    mem.write(KERNEL_LOAD_ADDR, kernel)
    return KERNEL_LOAD_ADDR + 0x200, kernel_end  # startup_64 sits 0x200 into the PM kernel


def _synth_header(bp: bytearray) -> None:
    """An ELF kernel has no setup header: write the fields the kernel reads."""
    struct.pack_into("<H", bp, BP_BOOT_FLAG, 0xAA55)
    bp[BP_HEADER : BP_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", bp, BP_VERSION, 0x020F)
    struct.pack_into("<I", bp, BP_KERNEL_ALIGNMENT, 0x1000000)
    struct.pack_into("<I", bp, BP_INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<I", bp, BP_CMDLINE_SIZE, CMDLINE_MAX - 1)


ELF_MAX_PHDRS = 64
PT_LOAD = 1
_ZEROS = bytes(1 << 20)


def _load_elf(mem: GuestMemory, image: bytes) -> tuple[int, int]:
    """Load PT_LOAD segments at their physical addresses; return (entry, end of image)."""
    if len(image) < 64 or image[4] != 2 or image[5] != 1:
        raise BootError("ELF kernel is not a 64-bit little-endian ELF")
    e_type, e_machine = struct.unpack_from("<HH", image, 16)
    if e_type != 2 or e_machine != 62:
        raise BootError(
            f"ELF kernel is not an x86-64 executable (type {e_type}, machine {e_machine})"
        )
    e_entry, e_phoff = struct.unpack_from("<QQ", image, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 54)
    if e_phentsize != 56 or not 0 < e_phnum <= ELF_MAX_PHDRS or e_phoff + 56 * e_phnum > len(image):
        raise BootError("ELF kernel has a malformed program header table")
    entry_pa: int | None = None
    end = 0
    loaded: list[tuple[int, int]] = []  # physical ranges so far: overlaps are refused
    for i in range(e_phnum):
        p_type, _flags, off, vaddr, paddr, filesz, memsz = struct.unpack_from(
            "<IIQQQQQ", image, e_phoff + 56 * i
        )
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or off + filesz > len(image):
            raise BootError(f"ELF segment {i} lies outside the file")
        if paddr < KERNEL_LOAD_ADDR or paddr + memsz > mem.size:
            raise BootError(
                f"ELF segment {i} at {paddr:#x}+{memsz:#x} is outside guest RAM above 1 MiB "
                f"(RAM {mem.size:#x})"
            )
        if any(paddr < b_end and b < paddr + memsz for b, b_end in loaded):
            raise BootError(f"ELF segment {i} at {paddr:#x}+{memsz:#x} overlaps another segment")
        loaded.append((paddr, paddr + memsz))
        mem.write(paddr, image[off : off + filesz])
        for z in range(paddr + filesz, paddr + memsz, len(_ZEROS)):  # no RAM-sized temporaries
            mem.write(z, _ZEROS[: paddr + memsz - z])
        if paddr <= e_entry < paddr + memsz:  # vmlinux: e_entry is phys_startup_64
            entry_pa = e_entry
        elif vaddr <= e_entry < vaddr + memsz and entry_pa is None:
            entry_pa = e_entry - vaddr + paddr
        end = max(end, paddr + memsz)
    if entry_pa is None:
        raise BootError(f"ELF entry point {e_entry:#x} is not inside any loaded segment")
    return entry_pa, end


# --- boot_params pieces -------------------------------------------------------------------


def _put_cmdline(mem: GuestMemory, bp: bytearray, cmdline: str) -> None:
    raw = cmdline.encode()
    limit = min(CMDLINE_MAX - 1, struct.unpack_from("<I", bp, BP_CMDLINE_SIZE)[0] or 255)
    if b"\0" in raw or len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes; this kernel accepts {limit}")
    mem.write(CMDLINE_ADDR, raw + b"\0")
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, 0)


def _put_initrd(mem: GuestMemory, bp: bytearray, initrd: bytes, kernel_end: int) -> int:
    addr_max = struct.unpack_from("<I", bp, BP_INITRD_ADDR_MAX)[0] or 0x37FFFFFF
    top = min(mem.size, addr_max + 1)
    addr = (top - len(initrd)) & ~0xFFF
    if addr < kernel_end:
        raise BootError(
            f"initrd of {len(initrd)} bytes does not fit between the kernel (ends {kernel_end:#x}) "
            f"and {top:#x}: give the VM more memory"
        )
    mem.write(addr, initrd)
    struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, addr, len(initrd))
    return addr


def _put_e820(bp: bytearray, entries: list[tuple[int, int, int]]) -> None:
    assert len(entries) <= E820_MAX
    for i, (addr, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, addr, size, kind)
    bp[BP_E820_ENTRIES] = len(entries)


def _put_setup_data(mem: GuestMemory, bp: bytearray, seed: bytes) -> None:
    # struct setup_data { u64 next; u32 type; u32 len; u8 data[]; } — one node, end of chain.
    mem.write(SETUP_DATA_ADDR, struct.pack("<QII", 0, SETUP_RNG_SEED, len(seed)) + seed)
    struct.pack_into("<Q", bp, BP_SETUP_DATA, SETUP_DATA_ADDR)


# --- CPU structures -----------------------------------------------------------------------


def _seg(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte GDT descriptor (access byte, flags nibble: G, D/B, L, AVL)."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | ((limit >> 16) & 0xF) << 48
        | flags << 52
        | ((base >> 24) & 0xFF) << 56
    )


def _put_gdt_tss(mem: GuestMemory) -> None:
    code = _seg(0, 0xFFFFF, 0x9B, 0xA)  # present, ring 0, exec/read, accessed; G + L
    data = _seg(0, 0xFFFFF, 0x93, 0xC)  # present, ring 0, read/write, accessed; G + D/B
    tss_lo = _seg(TSS_ADDR, TSS_LIMIT, 0x8B, 0x0)  # present, 64-bit TSS, busy
    tss_hi = TSS_ADDR >> 32
    mem.write(GDT_ADDR, struct.pack("<6Q", 0, 0, code, data, tss_lo, tss_hi))
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 0x66, TSS_LIMIT + 1)  # I/O bitmap base past the limit: none
    mem.write(TSS_ADDR, bytes(tss))


def _put_page_tables(mem: GuestMemory) -> None:
    present_rw, huge = 0x3, 0x80
    mem.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | present_rw) + bytes(4096 - 8))
    pdpt = [PD_ADDR + 4096 * i | present_rw for i in range(MAPPED_GIB)]
    mem.write(PDPT_ADDR, struct.pack(f"<{MAPPED_GIB}Q", *pdpt) + bytes(4096 - 8 * MAPPED_GIB))
    pds = struct.pack(
        f"<{512 * MAPPED_GIB}Q", *((i << 21) | present_rw | huge for i in range(512 * MAPPED_GIB))
    )
    mem.write(PD_ADDR, pds)
