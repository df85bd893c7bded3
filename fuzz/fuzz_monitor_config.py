"""Fuzz the monitor's config line (MonitorConfig.decode): only SporeError may escape.

Whatever decodes must satisfy the documented bounds and survive an
encode/decode round trip unchanged.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.errors import SporeError
    from sporevm.spore.monitor import MonitorConfig


def TestOneInput(data: bytes) -> None:
    try:
        cfg = MonitorConfig.decode(data)
    except SporeError:
        return
    assert cfg.memory % 4096 == 0 and 2 << 20 <= cfg.memory <= 3 << 30
    assert 1 <= cfg.vcpus <= 64 and cfg.agent_fd >= 3
    assert cfg.timeout is None or 0 < cfg.timeout <= 1e9
    for s in (cfg.kernel, cfg.initrd, cfg.rootfs, cfg.serial_log, cfg.cmdline):
        assert isinstance(s, str) and "\0" not in s
    restoring = cfg.restore is not None
    assert (cfg.restore_id is not None) == restoring
    assert (cfg.kernel_digest is not None) == restoring == (cfg.initrd_digest is not None)
    assert MonitorConfig.decode(cfg.encode()) == cfg


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
