"""Fuzz the monitor's config line (MonitorConfig.decode): only SporeError may escape.

Whatever decodes must satisfy the documented bounds and survive an
encode/decode round trip unchanged.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.errors import SporeError
    from sporevm.runtime.monitor_config import MonitorConfig


def TestOneInput(data: bytes) -> None:
    try:
        cfg = MonitorConfig.decode(data)
    except SporeError:
        return
    vm = cfg.vm
    assert vm.memory % 4096 == 0 and 2 << 20 <= vm.memory <= 3 << 30
    assert 1 <= vm.vcpus <= 64 and cfg.agent_fd >= 3
    assert vm.timeout is None or 0 < vm.timeout <= 1e9
    for s in (str(vm.kernel), str(vm.initrd), str(vm.rootfs), str(cfg.serial_log), vm.cmdline):
        assert isinstance(s, str) and "\0" not in s
    if vm.restore is not None:  # the restore's fields come together or not at all
        for digest in (vm.restore.manifest_id, vm.restore.kernel_digest, vm.restore.initrd_digest):
            assert digest.startswith("blake3:") and len(digest) == 71
    if cfg.net is not None:  # the NIC's fields come together, in range, never the agent's fd
        assert cfg.net.fd >= 3 and cfg.net.fd != cfg.agent_fd and 68 <= cfg.net.mtu <= 65522
        assert len(cfg.net.mac) == 6 and not cfg.net.mac[0] & 1 and any(cfg.net.mac)
    if cfg.ram_image is not None:  # only for an eager restore, on a descriptor of its own
        assert vm.restore is not None and vm.restore.ram.value == "eager"
        assert cfg.ram_image.fd >= 3 and cfg.ram_image.fd != cfg.agent_fd
        assert cfg.net is None or cfg.ram_image.fd != cfg.net.fd
        assert cfg.ram_image.index.startswith("blake3:") and len(cfg.ram_image.index) == 71
    assert MonitorConfig.decode(cfg.encode()) == cfg


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
