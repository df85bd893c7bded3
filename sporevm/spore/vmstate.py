"""The VM state object of a spore: named, versioned fields in canonical JSON (docs/vm-state.md).

Everything a paused VM holds outside guest RAM — per vCPU registers, MSRs, LAPIC,
events; the VM's irqchip, PIT and KVM clock; the board devices — encoded as
``{"format": "spore-vmstate/v1", "vcpus": [...], "vm": {...}, "devices": {...}}``.

KVM structs are not dumped raw: each struct field becomes a JSON field of the
same name (the layouts in ``sporevm/spore/x86.py`` are the schema; padding and
reserved fields are dropped and written back as zero). Small byte arrays are
lowercase hex of exact length; the two register pages (LAPIC, 1024 B; XSAVE,
4096 B) are canonical base64 of exact length.

Decoding parses outside input (spores may come from untrusted peers): the
input must be exactly the canonical encoding of what it decodes to (sorted
keys, no whitespace, ints only, no floats/NaN/duplicate keys), every object
must have exactly the expected fields, every integer must fit its KVM field.
Anything else is one-line VmStateError. Semantic checks of register values are
the backend's (KVM's): it turns its refusals into VmStateError too.

This is the spore format: it imports no VMM. A backend produces and consumes
these objects (docs/vmm.md, "Backends"); the KVM one in ``sporevm/vmm``.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sporevm.errors import SporeError
from sporevm.spore.x86 import (
    IoapicState,
    KvmClockData,
    KvmFpu,
    KvmLapicState,
    KvmPitState2,
    KvmRegs,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
    PicState,
)
from sporevm.strictjson import no_duplicate_keys, reject_constant, reject_float

FORMAT = "spore-vmstate/v1"
MAX_VCPUS = 64
MAX_VIRTIO_DEVICES = 16
SERIAL_RX_LIMIT = 4096  # bytes the 16550 buffers for the guest (its RX_LIMIT)
# Console pending bytes may reach 16 MiB (hex doubles it); everything else is a few KiB.
MAX_STATE_BYTES = 40 << 20
MAX_DEVICE_STRING = 2 * (16 << 20)

JsonObj = dict[str, Any]


class VmStateError(SporeError):
    """A VM state object is malformed, from an unknown version, or cannot be applied."""


# --- the MSRs the VMM owns ---------------------------------------------------------------
# Captured when KVM lists them (KVM_GET_MSR_INDEX_LIST) and this vCPU can read them.
# FS/GS base are left out: they travel in sregs. Why each one is here:
OWNED_MSRS: dict[int, str] = {
    0x10: "TSC",  # guest TSC continues from its captured value (restored before kvmclock)
    0x11: "KVM_WALL_CLOCK",  # kvmclock (old numbers): guest page the host writes
    0x12: "KVM_SYSTEM_TIME",  # kvmclock (old numbers): per-vCPU pvclock page
    0x1B: "APIC_BASE",  # LAPIC enable/x2APIC mode; must precede the LAPIC registers
    0x3B: "TSC_ADJUST",
    0x48: "SPEC_CTRL",  # mitigation state the guest kernel chose
    0x174: "SYSENTER_CS",
    0x175: "SYSENTER_ESP",
    0x176: "SYSENTER_EIP",
    0x1A0: "MISC_ENABLE",
    0x277: "PAT",  # page attribute table: wrong PAT = wrong caching of guest mappings
    **{0x200 + i: f"MTRR_PHYS{'BASE' if i % 2 == 0 else 'MASK'}{i // 2}" for i in range(16)},
    0x250: "MTRR_FIX64K_00000",
    0x258: "MTRR_FIX16K_80000",
    0x259: "MTRR_FIX16K_A0000",
    **{0x268 + i: f"MTRR_FIX4K_{0xC0000 + i * 0x8000:X}" for i in range(8)},
    0x2FF: "MTRR_DEF_TYPE",
    0x6E0: "TSC_DEADLINE",  # the LAPIC timer in TSC-deadline mode; set after the LAPIC
    0xDA0: "XSS",  # supervisor XSAVE components
    0xC0000080: "EFER",  # also in sregs; repeated so the MSR view agrees
    0xC0000081: "STAR",  # syscall entry: a guest loses its syscalls without these four
    0xC0000082: "LSTAR",
    0xC0000083: "CSTAR",
    0xC0000084: "SFMASK",
    0xC0000102: "KERNEL_GS_BASE",  # swapgs partner: the kernel's per-CPU base
    0xC0000103: "TSC_AUX",  # rdtscp/rdpid CPU number
    0x4B564D00: "KVM_WALL_CLOCK_NEW",
    0x4B564D01: "KVM_SYSTEM_TIME_NEW",
    # Withheld from the guest's CPUID (docs/vmm.md), so normally 0; kept so a guest that
    # enabled them anyway is carried faithfully rather than silently dropped.
    0x4B564D02: "KVM_ASYNC_PF_EN",
    0x4B564D03: "KVM_STEAL_TIME",
    0x4B564D04: "KVM_PV_EOI_EN",
    0x4B564D05: "KVM_POLL_CONTROL",
    0x4B564D06: "KVM_ASYNC_PF_INT",
}
MSR_TSC_DEADLINE = 0x6E0


# --- the virtio-mmio transport's state fields (docs/devices.md, "Snapshot state") ---------
# A transport's state() has exactly these fields, each queue's exactly those; a state
# from another transport version is refused before any VM exists. The values are
# checked against the attached device by the backend's transport (VirtioMmio.restore).
VIRTIO_STATE_VERSION = 1
VIRTIO_TRANSPORT_FIELDS = frozenset(
    {
        "version",
        "device_id",
        "status",
        "device_features_sel",
        "driver_features",
        "driver_features_sel",
        "queue_sel",
        "interrupt_status",
        "config_generation",
        "error",
        "queues",
        "device",
    }
)
VIRTIO_QUEUE_FIELDS = frozenset(
    {
        "size",
        "ready",
        "desc_addr",
        "avail_addr",
        "used_addr",
        "last_avail_idx",
        "used_idx",
        "indirect",
    }
)


# --- the state objects ------------------------------------------------------------------


@dataclass
class VcpuState:
    regs: KvmRegs
    sregs: KvmSregs
    fpu: KvmFpu
    xsave: KvmXsave
    xcrs: KvmXcrs
    msrs: dict[int, int]  # index -> value, indices from OWNED_MSRS
    lapic: KvmLapicState
    events: KvmVcpuEvents
    mp_state: int


@dataclass
class SerialState:
    """The COM1 16550A's registers and receive buffer (``Serial.state()``/``restore()``)."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    divisor: int
    rx: bytes  # received bytes the guest has not read yet
    thre_pending: bool


@dataclass
class VmWideState:
    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState
    pit2: KvmPitState2
    clock: KvmClockData


@dataclass
class VmState:
    vcpus: list[VcpuState]
    vm: VmWideState
    serial: SerialState
    # VirtioMmio.state() per board slot, in slot order (docs/devices.md, "Snapshot state");
    # its fields are checked for shape here and fully by VirtioMmio.restore.
    virtio: list[JsonObj] = field(default_factory=list)


# --- ctypes struct <-> named JSON fields ---------------------------------------------------

_PADDING = frozenset({"pad", "pad0", "pad1", "pad2", "padding", "padding1", "reserved"})
_S = TypeVar("_S", bound=ctypes.Structure)


@functools.cache  # a handful of ctypes types, asked about hundreds of times per state
def _fields(cls: type[ctypes.Structure]) -> list[tuple[str, Any]]:
    fields: list[tuple[Any, ...]] = getattr(cls, "_fields_")  # noqa: B009  (untyped in stubs)
    return [(f[0], f[1]) for f in fields if f[0] not in _PADDING]


@functools.cache
def _kind(t: Any) -> str:
    """Which JSON shape a ctypes field type maps to: int, bytes, array or struct."""
    # Not narrowed with isinstance on purpose: the ctypes stubs do not type `_type_`.
    code: Any = getattr(t, "_type_", None)
    is_type = isinstance(t, type)
    if is_type and issubclass(t, ctypes._SimpleCData) and code in tuple("bBhHiIlLqQ"):
        return "int"
    if is_type and issubclass(t, ctypes.Array):
        return "bytes" if code in (ctypes.c_uint8, ctypes.c_char) else "array"
    if is_type and issubclass(t, ctypes.Structure):
        return "struct"
    raise TypeError(f"no JSON mapping for {t!r}")  # a layout this codec does not know


@functools.cache
def _int_range(t: Any) -> tuple[int, int]:
    bits = 8 * ctypes.sizeof(t)
    if str(t._type_).islower():  # signed ctypes codes are lowercase
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def struct_to_json(s: ctypes.Structure) -> JsonObj:
    """Every non-padding field of ``s`` by name (ints, hex byte arrays, lists, objects)."""
    base = ctypes.addressof(s)
    out: JsonObj = {}
    for name, t in _fields(type(s)):
        off = getattr(type(s), name).offset
        out[name] = _value_to_json(base + off, t)
    return out


def _value_to_json(addr: int, t: Any) -> Any:
    kind = _kind(t)
    if kind == "int":
        return int(t.from_address(addr).value)
    if kind == "bytes":
        return ctypes.string_at(addr, ctypes.sizeof(t)).hex()
    if kind == "array":
        step = ctypes.sizeof(t._type_)
        return [_value_to_json(addr + i * step, t._type_) for i in range(t._length_)]
    return struct_to_json(t.from_address(addr))


def struct_from_json(cls: type[_S], value: object, where: str) -> _S:
    """Strict inverse of ``struct_to_json``: exact fields, exact lengths, in-range ints."""
    s = cls()
    _fill(ctypes.addressof(s), cls, value, where)
    return s


def _fill(addr: int, t: Any, value: object, where: str) -> None:
    kind = _kind(t)
    if kind == "int":
        lo, hi = _int_range(t)
        t.from_address(addr).value = _int(value, where, lo, hi)
    elif kind == "bytes":
        raw = _hex(value, where, ctypes.sizeof(t), exact=True)
        ctypes.memmove(addr, raw, len(raw))
    elif kind == "array":
        n: int = t._length_
        if not isinstance(value, list) or len(value) != n:
            raise VmStateError(f"{where}: expected a list of {n} entries")
        step = ctypes.sizeof(t._type_)
        for i, v in enumerate(value):
            _fill(addr + i * step, t._type_, v, f"{where}[{i}]")
    else:
        obj = _obj(value, where, {n for n, _ in _fields(t)})
        for name, ft in _fields(t):
            _fill(addr + getattr(t, name).offset, ft, obj[name], f"{where}.{name}")


# --- field readers (one-line errors naming the field) --------------------------------------


def _obj(value: object, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise VmStateError(f"{where}: expected an object")
    got = set(value)
    if got != keys:
        missing, extra = sorted(keys - got), sorted(got - keys)
        raise VmStateError(f"{where}: missing fields {missing}, unknown fields {extra}")
    return value


def _int(value: object, where: str, lo: int, hi: int) -> int:
    # bool is an int subclass; `true` for a register is corrupt input.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise VmStateError(f"{where}: expected an integer in [{lo}, {hi}]")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise VmStateError(f"{where}: expected a boolean")
    return value


def _hex(value: object, where: str, size: int, *, exact: bool) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * size or (exact and len(value) != 2 * size):
        want = f"exactly {size}" if exact else f"at most {size}"
        raise VmStateError(f"{where}: expected lowercase hex of {want} bytes")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = None
    if raw is None or raw.hex() != value:  # fromhex also takes spaces and uppercase
        raise VmStateError(f"{where}: not lowercase hex")
    return raw


def _b64(value: object, where: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) != 4 * ((size + 2) // 3):
        raise VmStateError(f"{where}: expected base64 of exactly {size} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = None
    if raw is None or len(raw) != size or base64.b64encode(raw).decode() != value:
        raise VmStateError(f"{where}: not canonical base64 of {size} bytes")
    return raw


def _blob(cls: type[_S], value: object, where: str) -> _S:
    return cls.from_buffer_copy(_b64(value, where, ctypes.sizeof(cls)))


def _b64_of(s: ctypes.Structure) -> str:
    return base64.b64encode(ctypes.string_at(ctypes.addressof(s), ctypes.sizeof(s))).decode()


# --- encode -------------------------------------------------------------------------------


def to_json(state: VmState) -> JsonObj:
    return {
        "format": FORMAT,
        "vcpus": [_vcpu_to_json(i, v) for i, v in enumerate(state.vcpus)],
        "vm": {
            "irqchip": {
                "pic_master": struct_to_json(state.vm.pic_master),
                "pic_slave": struct_to_json(state.vm.pic_slave),
                "ioapic": struct_to_json(state.vm.ioapic),
            },
            "pit2": struct_to_json(state.vm.pit2),
            "clock": struct_to_json(state.vm.clock),
        },
        "devices": {
            "serial": {
                "ier": state.serial.ier,
                "lcr": state.serial.lcr,
                "mcr": state.serial.mcr,
                "scr": state.serial.scr,
                "fcr": state.serial.fcr,
                "divisor": state.serial.divisor,
                "rx": state.serial.rx.hex(),
                "thre_pending": state.serial.thre_pending,
            },
            "virtio": state.virtio,
        },
    }


def _vcpu_to_json(index: int, v: VcpuState) -> JsonObj:
    return {
        "index": index,
        "regs": struct_to_json(v.regs),
        "sregs": struct_to_json(v.sregs),
        "fpu": struct_to_json(v.fpu),
        "xsave": _b64_of(v.xsave),
        "xcrs": struct_to_json(v.xcrs),
        "msrs": [{"index": k, "value": v.msrs[k]} for k in sorted(v.msrs)],
        "lapic": _b64_of(v.lapic),
        "events": struct_to_json(v.events),
        "mp_state": v.mp_state,
    }


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def encode(state: VmState) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII, ints only."""
    return canonical(to_json(state))


# --- decode -------------------------------------------------------------------------------


def decode(data: bytes) -> VmState:
    """Parse and validate a VM state object; VmStateError on anything unexpected."""
    if len(data) > MAX_STATE_BYTES:
        raise VmStateError(f"VM state is {len(data)} bytes, more than {MAX_STATE_BYTES}")
    try:
        raw = json.loads(
            data.decode("ascii"),
            object_pairs_hook=no_duplicate_keys,
            parse_float=reject_float,
            parse_constant=reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VmStateError(f"VM state is not ASCII JSON: {str(e)[:120]}") from None
    state = from_json(raw)
    # One encoding per state: a spore's bytes (and so its digest) cannot vary for equal state.
    if canonical(raw) != data:
        raise VmStateError("VM state is not in canonical form (sorted keys, no whitespace)")
    return state


def from_json(raw: object) -> VmState:
    top = _obj(raw, "vmstate", {"format", "vcpus", "vm", "devices"})
    if top["format"] != FORMAT:
        raise VmStateError(f"vmstate.format: unsupported {str(top['format'])[:40]!r}")
    vcpus = top["vcpus"]
    if not isinstance(vcpus, list) or not 1 <= len(vcpus) <= MAX_VCPUS:
        raise VmStateError(f"vmstate.vcpus: expected a list of 1..{MAX_VCPUS} vCPUs")
    vm = _obj(top["vm"], "vm", {"irqchip", "pit2", "clock"})
    chip = _obj(vm["irqchip"], "vm.irqchip", {"pic_master", "pic_slave", "ioapic"})
    dev = _obj(top["devices"], "devices", {"serial", "virtio"})
    return VmState(
        vcpus=[_vcpu_from_json(i, v) for i, v in enumerate(vcpus)],
        vm=VmWideState(
            pic_master=struct_from_json(PicState, chip["pic_master"], "vm.irqchip.pic_master"),
            pic_slave=struct_from_json(PicState, chip["pic_slave"], "vm.irqchip.pic_slave"),
            ioapic=struct_from_json(IoapicState, chip["ioapic"], "vm.irqchip.ioapic"),
            pit2=struct_from_json(KvmPitState2, vm["pit2"], "vm.pit2"),
            clock=struct_from_json(KvmClockData, vm["clock"], "vm.clock"),
        ),
        serial=_serial_from_json(dev["serial"]),
        virtio=_virtio_from_json(dev["virtio"]),
    )


_VCPU_KEYS = {
    "index",
    "regs",
    "sregs",
    "fpu",
    "xsave",
    "xcrs",
    "msrs",
    "lapic",
    "events",
    "mp_state",
}
MAX_MP_STATE = 8  # KVM_MP_STATE_AP_RESET_HOLD; KVM rejects states invalid for x86 itself
MAX_XCRS = 16


def _vcpu_from_json(i: int, value: object) -> VcpuState:
    w = f"vcpus[{i}]"
    v = _obj(value, w, _VCPU_KEYS)
    _int(v["index"], f"{w}.index", i, i)
    xcrs = struct_from_json(KvmXcrs, v["xcrs"], f"{w}.xcrs")
    if xcrs.nr_xcrs > MAX_XCRS:
        raise VmStateError(f"{w}.xcrs.nr_xcrs: more than {MAX_XCRS}")
    return VcpuState(
        regs=struct_from_json(KvmRegs, v["regs"], f"{w}.regs"),
        sregs=struct_from_json(KvmSregs, v["sregs"], f"{w}.sregs"),
        fpu=struct_from_json(KvmFpu, v["fpu"], f"{w}.fpu"),
        xsave=_blob(KvmXsave, v["xsave"], f"{w}.xsave"),
        xcrs=xcrs,
        msrs=_msrs_from_json(v["msrs"], f"{w}.msrs"),
        lapic=_blob(KvmLapicState, v["lapic"], f"{w}.lapic"),
        events=struct_from_json(KvmVcpuEvents, v["events"], f"{w}.events"),
        mp_state=_int(v["mp_state"], f"{w}.mp_state", 0, MAX_MP_STATE),
    )


def _msrs_from_json(value: object, where: str) -> dict[int, int]:
    if not isinstance(value, list) or len(value) > len(OWNED_MSRS):
        raise VmStateError(f"{where}: expected a list of at most {len(OWNED_MSRS)} MSRs")
    out: dict[int, int] = {}
    prev = -1
    for k, item in enumerate(value):
        e = _obj(item, f"{where}[{k}]", {"index", "value"})
        idx = _int(e["index"], f"{where}[{k}].index", 0, 0xFFFF_FFFF)
        if idx not in OWNED_MSRS:
            raise VmStateError(f"{where}[{k}].index: MSR {idx:#x} is not one the VMM owns")
        if idx <= prev:
            raise VmStateError(f"{where}: indices not strictly ascending at {idx:#x}")
        prev = idx
        out[idx] = _int(e["value"], f"{where}[{k}].value", 0, (1 << 64) - 1)
    return out


_SERIAL_KEYS = {"ier", "lcr", "mcr", "scr", "fcr", "divisor", "rx", "thre_pending"}


def _serial_from_json(value: object) -> SerialState:
    w = "devices.serial"
    s = _obj(value, w, _SERIAL_KEYS)
    fcr = _int(s["fcr"], f"{w}.fcr", 0, 0xFF)
    if fcr & ~0xC9:  # the UART keeps only these FCR bits
        raise VmStateError(f"{w}.fcr: bits {fcr:#x} a 16550 does not keep")
    return SerialState(
        ier=_int(s["ier"], f"{w}.ier", 0, 0x0F),
        lcr=_int(s["lcr"], f"{w}.lcr", 0, 0xFF),
        mcr=_int(s["mcr"], f"{w}.mcr", 0, 0x1F),
        scr=_int(s["scr"], f"{w}.scr", 0, 0xFF),
        fcr=fcr,
        divisor=_int(s["divisor"], f"{w}.divisor", 0, 0xFFFF),
        rx=_hex(s["rx"], f"{w}.rx", SERIAL_RX_LIMIT, exact=False),
        thre_pending=_bool(s["thre_pending"], f"{w}.thre_pending"),
    )


def _virtio_from_json(value: object) -> list[JsonObj]:
    """Shape checks only; VirtioMmio.restore checks every value against the live device."""
    if not isinstance(value, list) or len(value) > MAX_VIRTIO_DEVICES:
        raise VmStateError(f"devices.virtio: expected a list of <= {MAX_VIRTIO_DEVICES}")
    out: list[JsonObj] = []
    for i, t in enumerate(value):
        w = f"devices.virtio[{i}]"
        # The transport's own field list: a state from another transport version is refused
        # here, before any VM exists.
        s = _obj(t, w, set(VIRTIO_TRANSPORT_FIELDS))
        if s["version"] != VIRTIO_STATE_VERSION:
            raise VmStateError(f"{w}.version: unsupported {str(s['version'])[:20]}")
        for k, v in s.items():
            if k not in ("queues", "device"):
                _scalar(v, f"{w}.{k}")
        queues = s["queues"]
        if not isinstance(queues, list) or len(queues) > 8:
            raise VmStateError(f"{w}.queues: expected a list of <= 8 queues")
        for q, qs in enumerate(queues):
            for k, v in _obj(qs, f"{w}.queues[{q}]", set(VIRTIO_QUEUE_FIELDS)).items():
                _scalar(v, f"{w}.queues[{q}].{k}")
        d = s["device"]
        if not isinstance(d, dict) or len(d) > 16:
            raise VmStateError(f"{w}.device: expected an object of <= 16 fields")
        for k, v in d.items():
            _scalar(v, f"{w}.device.{k}")
        out.append(s)  # type: ignore[arg-type]  # checked to be a dict by _obj
    return out


def _scalar(v: object, where: str) -> None:
    if isinstance(v, bool):
        return
    if isinstance(v, int):
        _int(v, where, 0, (1 << 64) - 1)
    elif isinstance(v, str):
        if len(v) > MAX_DEVICE_STRING:
            raise VmStateError(f"{where}: string longer than {MAX_DEVICE_STRING}")
    else:
        raise VmStateError(f"{where}: expected an integer, boolean or string")
