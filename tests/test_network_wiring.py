"""The guest network's wiring, without a guest: the monitor config's NIC fields, the
board's NIC slot and its state in a snapshot, the manifest's network and device model,
the agent's NET_CONFIG message, the Sporefile's network: and the cache keys.

Real guests and the gateway: tests/test_network_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sporevm.build.cachekeys import boot_key, step_keys
from sporevm.build.guest import GuestPlatform
from sporevm.egress import PolicyError
from sporevm.errors import SporeError
from sporevm.runtime.agent import ErrorCode, MsgType
from sporevm.runtime.agent_messages import NetConfig
from sporevm.runtime.agent_session import AgentError
from sporevm.runtime.capture import capture
from sporevm.runtime.monitor_config import MonitorConfig, NetWiring, VmConfig
from sporevm.runtime.network import NetworkSpec, interface_config
from sporevm.runtime.protocol import ProtocolError
from sporevm.runtime.restore import restore_board
from sporevm.spore import manifest as mf
from sporevm.spore import platform, vmstate
from sporevm.spore.vmstate import VmStateError
from sporevm.sporefile import loads
from sporevm.vmm.board import BoardConfig, BoardWiring, build_board
from sporevm.vmm.board import NetConfig as BoardNet
from tests.test_guest_agent import Running, agent, agent_bin  # noqa: F401  (fixtures)
from tests.test_manifest import sample

RAM = 32 << 20
needs_kvm = pytest.mark.skipif(
    not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"
)


# --- the monitor config line -------------------------------------------------------------


def config(net: NetWiring | None) -> MonitorConfig:
    vm = VmConfig(Path("/k"), Path("/i"), Path("/r"), "console=ttyS0", 64 << 20)
    return MonitorConfig(vm, 3, Path("/s"), net)


def test_config_carries_the_nic_or_nothing() -> None:
    with_net = config(NetWiring(4, platform.GUEST_MAC, 1500))
    assert MonitorConfig.decode(with_net.encode().strip()) == with_net
    without = config(None)
    assert MonitorConfig.decode(without.encode().strip()) == without
    # Older callers omit the fields: no NIC.
    doc = without.wire()
    for name in ("net_fd", "net_mac", "net_mtu"):
        del doc[name]
    assert MonitorConfig.decode(json.dumps(doc).encode()).net is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"net_fd": 4, "net_mac": None, "net_mtu": None}, "all set or all null"),
        ({"net_fd": 3, "net_mac": "025350524502", "net_mtu": 1500}, "differ from agent_fd"),
        ({"net_fd": 2, "net_mac": "025350524502", "net_mtu": 1500}, "net_fd must be"),
        ({"net_fd": 4, "net_mac": "035350524502", "net_mtu": 1500}, "unicast"),
        ({"net_fd": 4, "net_mac": "000000000000", "net_mtu": 1500}, "unicast"),
        ({"net_fd": 4, "net_mac": "02535052450", "net_mtu": 1500}, "12 lowercase hex"),
        ({"net_fd": 4, "net_mac": "02535052450G", "net_mtu": 1500}, "12 lowercase hex"),
        ({"net_fd": 4, "net_mac": "025350524502", "net_mtu": 67}, "net_mtu must be"),
        ({"net_fd": 4, "net_mac": "025350524502", "net_mtu": 65523}, "net_mtu must be"),
        ({"net_fd": 4, "net_mac": "025350524502", "net_mtu": True}, "net_mtu must be"),
    ],
)
def test_config_refuses_bad_nic_fields(fields: dict[str, object], message: str) -> None:
    doc = {**config(None).wire(), **fields}
    with pytest.raises(ProtocolError, match=message):
        MonitorConfig.decode(json.dumps(doc).encode())


# --- the board: slot 3 only with a network, its state in the snapshot ----------------------


@pytest.fixture
def disk_fd() -> Iterator[int]:
    fd = os.memfd_create("disk")
    os.ftruncate(fd, 8192)
    yield fd
    os.close(fd)


@pytest.fixture
def channel() -> Iterator[socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a
    a.close()
    b.close()


def board_cfg(disk_fd: int, net_fd: int | None) -> BoardConfig:
    net = None if net_fd is None else BoardNet(net_fd, platform.GUEST_MAC, platform.GUEST_MTU)
    return BoardConfig(RAM, 1, "console=ttyS0", disk_fd, 8192, b"root", net=net)


WIRING = BoardWiring(on_agent_output=lambda _b: None)


@needs_kvm
def test_no_network_no_nic(disk_fd: int) -> None:
    b = build_board(board_cfg(disk_fd, None), WIRING)
    with b.machine:
        assert b.net is None
        assert len(b.transports) == 3
        assert b.cmdline.count("virtio_mmio.device=") == 3
        assert f"{platform.VIRTIO_BASE + 3 * 0x1000:#x}" not in b.cmdline


@needs_kvm
def test_nic_in_slot_3_and_its_state_round_trips(disk_fd: int, channel: socket.socket) -> None:
    a = build_board(board_cfg(disk_fd, channel.fileno()), WIRING)
    with a.machine:
        assert a.net is not None and a.transports[3].device is a.net
        assert len(a.transports) == 4
        assert f"virtio_mmio.device=4K@{platform.VIRTIO_BASE + 0x3000:#x}:8" in a.cmdline
        state = capture(a.machine, a.transports)
        ram = a.machine.ram.read(0, RAM)
    data = vmstate.encode(state)
    assert state.virtio[3]["device"] == {
        "mac": platform.GUEST_MAC.hex(),
        "mtu": platform.GUEST_MTU,
        "link_status": True,
    }
    b = restore_board(
        vmstate.decode(data),
        board_cfg(disk_fd, channel.fileno()),
        lambda mem: mem.write(0, ram),
        WIRING,
    )
    with b.machine:
        assert [t.state() for t in b.transports] == state.virtio
    # A NIC's state on a board without one, and the other way round: refused.
    with pytest.raises(VmStateError, match="4 virtio devices, the board 3"):
        restore_board(vmstate.decode(data), board_cfg(disk_fd, None), lambda m: None, WIRING)
    c = build_board(board_cfg(disk_fd, None), WIRING)
    with c.machine:
        plain = vmstate.encode(capture(c.machine, c.transports))
    with pytest.raises(VmStateError, match="3 virtio devices, the board 4"):
        restore_board(
            vmstate.decode(plain), board_cfg(disk_fd, channel.fileno()), lambda m: None, WIRING
        )


# --- the manifest: network and device model -----------------------------------------------


def networked(allow: tuple[str, ...] = ("198.51.100.0/24", "mirror.test")) -> mf.Manifest:
    m = sample()
    return dataclasses.replace(
        m,
        platform=dataclasses.replace(m.platform, device_model=platform.DEVICE_MODEL_NET),
        network=allow,
    )


def test_manifest_network_is_optional_and_round_trips() -> None:
    plain = mf.encode(sample())
    assert b'"network"' not in plain  # spores without a NIC keep their bytes and ids
    data = mf.encode(networked())
    assert b'"network":{"allow":["198.51.100.0/24","mirror.test"]}' in data
    assert mf.decode(data) == networked()
    assert mf.decode(data).network == ("198.51.100.0/24", "mirror.test")


@pytest.mark.parametrize(
    ("m", "message"),
    [
        (networked(("mirror.test", "198.51.100.0/24")), "not sorted and unique"),
        (networked(("a.test", "a.test")), "non-unique"),
        (dataclasses.replace(networked(), network=None), "needs a network: entry"),
        (dataclasses.replace(sample(), network=("a.test",)), "needs platform.device_model"),
    ],
)
def test_manifest_network_cross_checks(m: mf.Manifest, message: str) -> None:
    with pytest.raises(mf.ManifestError, match=message):
        mf.encode(m)
    with pytest.raises(mf.ManifestError):
        mf.decode(mf.canonical(mf.to_document(m)))


@pytest.mark.parametrize(
    "bad", [{"allow": ["a b"]}, {"allow": [], "x": 1}, {}, {"allow": ["x" * 261]}, []]
)
def test_manifest_network_schema(bad: object) -> None:
    doc = mf.to_document(networked())
    doc["network"] = bad
    with pytest.raises(mf.ManifestError, match="network"):
        mf.decode(mf.canonical(doc))


def test_platform_check_names_the_missing_nic() -> None:
    m = networked()
    host = dataclasses.replace(m.platform, device_model=platform.DEVICE_MODEL)
    with pytest.raises(mf.PlatformMismatchError, match="^the spore has a NIC .* this VM has none"):
        mf.check_platform(m, host)
    with pytest.raises(mf.PlatformMismatchError, match="^the spore has no NIC"):
        mf.check_platform(
            sample(), dataclasses.replace(host, device_model=platform.DEVICE_MODEL_NET)
        )
    mf.check_platform(m, m.platform)


# --- the agent message ---------------------------------------------------------------------


def test_net_config_message() -> None:
    msg = interface_config()
    assert msg.TYPE is MsgType.NET_CONFIG and int(MsgType.NET_CONFIG) == 0x0E
    assert NetConfig.decode(msg.encode()) == msg
    assert len(msg.encode()) == 17
    assert (msg.address, msg.prefix, msg.gateway, msg.nameserver) == (
        0x0A00020F,
        24,
        0x0A000202,
        0x0A000202,
    )
    with pytest.raises(SporeError):
        NetConfig.decode(msg.encode() + b"\0")
    with pytest.raises(SporeError):
        NetConfig.decode(msg.encode()[:-1])


# --- policy, Sporefile, cache keys ---------------------------------------------------------


def test_network_spec_is_canonical_and_checked() -> None:
    spec = NetworkSpec.parse(["Mirror.Test.", "198.51.100.0/24", "mirror.test"])
    assert spec.allow == ("198.51.100.0/24", "mirror.test")
    with pytest.raises(PolicyError, match="inside the floor"):
        NetworkSpec.parse(["10.1.2.3"])
    with pytest.raises(PolicyError, match="inside the floor"):
        NetworkSpec.parse(["127.0.0.1:80"])


SPOREFILE = """\
sporefile: 1
name: net
base: {image: "127.0.0.1:5000/library/debian:bookworm"}
steps:
  - {name: one, run: "true"}
  - {name: two, run: "true"}
"""
GUEST = GuestPlatform(
    "kvm-pvm", Path("/k"), "blake3:" + "1" * 64, Path("/i"), "blake3:" + "2" * 64, "c"
)
ROOTFS = "blake3:" + "3" * 64


def keys(text: str, tmp_path: Path) -> list[str]:
    sf = loads(text, tmp_path / "Sporefile")
    return step_keys(sf, boot_key(sf, ROOTFS, GUEST))


def test_policy_is_in_every_step_key(tmp_path: Path) -> None:
    plain = keys(SPOREFILE, tmp_path)
    a = keys(SPOREFILE + "network: {allow: [mirror.test]}\n", tmp_path)
    same = keys(SPOREFILE + "network: {allow: [MIRROR.test.]}\n", tmp_path)
    b = keys(SPOREFILE + "network: {allow: [mirror.test, 198.51.100.7]}\n", tmp_path)
    empty = keys(SPOREFILE + "network: {allow: []}\n", tmp_path)
    assert a == same  # the canonical policy, not its spelling
    for x, y in [(plain, a), (a, b), (plain, empty), (a, empty)]:
        assert all(k1 != k2 for k1, k2 in zip(x, y, strict=True))


def test_sporefile_network(tmp_path: Path) -> None:
    sf = loads(SPOREFILE, tmp_path / "Sporefile")
    assert sf.network is None
    sf = loads(SPOREFILE + "network: {allow: [mirror.test, public]}\n", tmp_path / "Sporefile")
    assert sf.network == ("mirror.test", "public")
    for bad, where in [
        ("network: {allow: [a b]}\n", "network.allow[0]"),
        ("network: {}\n", "network.allow"),
        ("network: {allow: [x], other: 1}\n", "network"),
        ("network: [x]\n", "network"),
    ]:
        with pytest.raises(SporeError, match=rf"Sporefile:\d+:\d+: {re.escape(where)}"):
            loads(SPOREFILE + bad, tmp_path / "Sporefile")
    # A floor entry is refused (when the keys are made: before any VM), naming the file.
    with pytest.raises(SporeError, match=r"Sporefile: network.allow: .*inside the floor"):
        keys(SPOREFILE + "network: {allow: [192.168.1.0/24]}\n", tmp_path)


# --- the agent's side of NET_CONFIG (sandboxed: checked, never applied to this host) ----


@pytest.mark.parametrize(
    "bad",
    [
        {"prefix": 31},
        {"prefix": 7},
        {"mtu": 67},
        {"mtu": 65523},
        {"gateway": 0x0B000202},  # outside the guest's subnet
        {"gateway": 0x0A00020F},  # the guest's own address
        {"address": 0},
    ],
)
def test_agent_checks_net_config(agent: Running, bad: dict[str, int]) -> None:
    assert agent.session.hello().caps & (1 << MsgType.NET_CONFIG)
    agent.session.configure_network(interface_config())  # well-formed: done
    with pytest.raises(AgentError, match="NET_CONFIG: malformed") as exc:
        agent.session.configure_network(dataclasses.replace(interface_config(), **bad))
    assert exc.value.code == ErrorCode.BAD_PAYLOAD
