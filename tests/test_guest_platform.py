"""ensure_guest: which bytes it hashes before they reach a VM, and which it only names."""

from __future__ import annotations

from pathlib import Path

import pytest

from sporevm.build import guest
from sporevm.build.kernel import KernelArtifact, default_cmdline
from sporevm.build.progress import Reporter
from sporevm.store import Store, blake3_file


def fake_kernel(tmp_path: Path, host_class: str) -> KernelArtifact:
    d = tmp_path / "kernel"
    d.mkdir()
    (d / "bzImage").write_bytes(b"bz" * 1000)
    (d / "vmlinux").write_bytes(b"elf" * 1000)
    (d / "config").write_text("CONFIG_X=y\n")
    return KernelArtifact(
        blake3_file(d / "bzImage")[0],
        d / "bzImage",
        d / "config",
        host_class,  # type: ignore[arg-type]
        default_cmdline(host_class),
        d / "vmlinux",
        blake3_file(d / "vmlinux")[0],
    )


@pytest.mark.parametrize("host_class", ["kvm", "kvm-pvm"])
def test_only_the_boot_image_is_hashed_and_a_damaged_one_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_class: str
) -> None:
    art = fake_kernel(tmp_path, host_class)
    calls: list[bool] = []

    def ensure_kernel(store: Store, hc: str, progress: object, *, verify: bool = True) -> object:
        calls.append(verify)
        return art

    monkeypatch.setattr(guest, "detect_host_class", lambda: host_class)
    monkeypatch.setattr(guest, "ensure_kernel", ensure_kernel)
    store = Store(tmp_path / "store")
    boots, other = (
        (art.vmlinux_path, art.path) if host_class == "kvm-pvm" else (art.path, art.vmlinux_path)
    )
    other.write_bytes(b"damaged, and never booted")
    platform = guest.ensure_guest(store, Reporter.quiet())
    assert platform.kernel == boots and calls == [False]  # the unused image: not hashed
    boots.write_bytes(b"damaged")
    guest.ensure_guest(store, Reporter.quiet())
    assert calls == [False, False, True]  # the booted image failed: a verified lookup
    calls.clear()
    assert guest.ensure_guest(store, Reporter.quiet(), verify=False).kernel == boots
    assert calls == [False]  # a restore only names it


def test_a_restore_resolves_the_platform_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """guest_for_restore remembers ensure_guest(verify=False) per store, host class and
    PATH, and resolves again once a remembered entry is gone (pruned)."""
    made: list[guest.GuestPlatform] = []

    def ensure_guest(
        store: Store, reporter: Reporter, kernel: Path | None = None, *, verify: bool = True
    ) -> guest.GuestPlatform:
        assert verify is False and kernel is None
        k, i = tmp_path / f"kernel{len(made)}", tmp_path / f"initrd{len(made)}"
        k.write_bytes(b"k")
        i.write_bytes(b"i")
        made.append(
            guest.GuestPlatform("kvm", k, "blake3:" + "a" * 64, i, "blake3:" + "b" * 64, "")
        )
        return made[-1]

    monkeypatch.setattr(guest, "ensure_guest", ensure_guest)
    monkeypatch.setattr(guest, "_for_restore", {})
    store, quiet = Store(tmp_path / "s"), Reporter.quiet()
    first = guest.guest_for_restore(store, quiet)
    assert guest.guest_for_restore(store, quiet) is first and len(made) == 1
    first.kernel.unlink()  # its entry pruned: resolved again
    assert guest.guest_for_restore(store, quiet) is made[1]
    monkeypatch.setenv("PATH", "/elsewhere")  # another toolchain on PATH: another resolution
    assert guest.guest_for_restore(store, quiet) is made[2]
    assert guest.guest_for_restore(Store(tmp_path / "t"), quiet) is made[3]  # another store
    assert len(made) == 4
