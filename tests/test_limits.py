"""Bounds on outside input, tested at the boundary: the limit is accepted, limit + 1 is
refused with a one-line error naming the bound (docs/limits.md).

Bounds already tested on both sides elsewhere are listed in docs/limits.md with
their test and not repeated here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sporevm import sporefile, sporefile_yaml
from sporevm.build import lockfile, ocimanifest, ociref
from sporevm.build.layers import DEFAULT_LIMITS, Limits, apply_layers
from sporevm.errors import SporeError
from sporevm.net import auth as ociauth
from sporevm.runtime import monitor, monitor_config, protocol
from sporevm.runtime.monitor_config import MonitorConfig, VmConfig
from sporevm.vmm.devices.virtio.queue import MAX_INDIRECT, MAX_QUEUE_SIZE, ChainError, Virtqueue
from sporevm.vmm.memory import GuestMemory
from tests.layer_cases import file, make_tar, write_layers
from tests.virtio_driver import RAM, Allocator, DriverQueue

HEAD = "sporefile: 1\nname: app\nbase: {image: debian:bookworm}\n"
DIGEST = "sha256:" + "ab" * 32


def refused(fn: Callable[[], object], pattern: str) -> str:
    """fn() must raise a SporeError: one line, matching ``pattern``."""
    with pytest.raises(SporeError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    assert re.search(pattern, msg), msg
    return msg


def padded(doc: bytes, size: int) -> bytes:
    """A JSON document grown to exactly ``size`` bytes with trailing whitespace."""
    assert len(doc) <= size
    return doc + b" " * (size - len(doc))


# --- Sporefile and lock -------------------------------------------------------------------


def _sporefile(tmp_path: Path, text: str) -> sporefile.Sporefile:
    return sporefile.loads(text, tmp_path / "Sporefile")


def test_sporefile_size(tmp_path: Path) -> None:
    pad = sporefile.MAX_BYTES - len(HEAD) - 3
    at = HEAD + "#" + "x" * pad + "\n"
    assert len(at.encode()) == sporefile.MAX_BYTES - 1
    at += "\n"
    assert _sporefile(tmp_path, at).name == "app"
    refused(lambda: _sporefile(tmp_path, at + "\n"), "over the limit of 1048576")


def _env_list(n: int) -> str:
    return HEAD + "env: [" + ", ".join(["a"] * n) + "]\n"


def test_sporefile_yaml_node_count(tmp_path: Path) -> None:
    # Every node counts, the root mapping included: HEAD has 9, `env:` and its list 2 more.
    n = sporefile_yaml.MAX_NODES - 11
    msg = refused(lambda: _sporefile(tmp_path, _env_list(n)), "env")
    assert "keys and values" not in msg  # the schema refuses a list; the node bound did not
    refused(lambda: _sporefile(tmp_path, _env_list(n + 1)), r"more than 10000 keys and values")


def _nested(depth: int) -> str:
    """The innermost list ``depth`` levels below the document's top mapping."""
    return HEAD + "env: " + "[" * depth + "]" * depth + "\n"


def test_sporefile_yaml_nesting(tmp_path: Path) -> None:
    msg = refused(lambda: _sporefile(tmp_path, _nested(sporefile_yaml.MAX_DEPTH)), "env")
    assert "nested deeper" not in msg
    refused(
        lambda: _sporefile(tmp_path, _nested(sporefile_yaml.MAX_DEPTH + 1)),
        "nested deeper than 16 levels",
    )


def test_lock_size(tmp_path: Path) -> None:
    doc = json.dumps({"lockVersion": lockfile.LOCK_VERSION, "images": []}).encode()
    path = tmp_path / "Sporefile.lock"
    assert lockfile.decode(padded(doc, lockfile.MAX_LOCK_BYTES), path).images == ()
    refused(
        lambda: lockfile.decode(padded(doc, lockfile.MAX_LOCK_BYTES + 1), path),
        "larger than 1048576 bytes",
    )


# --- registries and OCI layouts -----------------------------------------------------------


def _manifest(layers: int) -> bytes:
    desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": DIGEST, "size": 1}
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": ocimanifest.OCI_MANIFEST,
            "config": {"mediaType": ocimanifest.OCI_CONFIG, "digest": DIGEST, "size": 2},
            "layers": [desc] * layers,
        }
    ).encode()


def _index(entries: int) -> bytes:
    m = {
        "mediaType": ocimanifest.OCI_MANIFEST,
        "digest": DIGEST,
        "size": 100,
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    return json.dumps(
        {"schemaVersion": 2, "mediaType": ocimanifest.OCI_INDEX, "manifests": [m] * entries}
    ).encode()


def _decode(data: bytes) -> Any:
    return ocimanifest.decode_manifest_or_index(data, what="doc")


def test_oci_document_size() -> None:
    doc = _manifest(1)
    _decode(padded(doc, ocimanifest.MAX_DOC_SIZE))
    refused(lambda: _decode(padded(doc, ocimanifest.MAX_DOC_SIZE + 1)), "larger than 4194304 bytes")


def test_oci_layers_per_manifest() -> None:
    _decode(_manifest(ocimanifest.MAX_LAYERS))
    refused(lambda: _decode(_manifest(ocimanifest.MAX_LAYERS + 1)), "500")


def test_oci_index_entries() -> None:
    _decode(_index(ocimanifest.MAX_INDEX_ENTRIES))
    refused(lambda: _decode(_index(ocimanifest.MAX_INDEX_ENTRIES + 1)), "1000")


def test_token_response_and_token_size() -> None:
    token = "t" * ociauth.MAX_TOKEN_LEN
    doc = json.dumps({"token": token}).encode()
    assert ociauth.decode_token_response(padded(doc, ociauth.MAX_TOKEN_RESPONSE), what="t") == token
    refused(
        lambda: ociauth.decode_token_response(
            padded(doc, ociauth.MAX_TOKEN_RESPONSE + 1), what="t"
        ),
        "larger than 1048576 bytes",
    )
    over = json.dumps({"token": token + "t"}).encode()
    refused(lambda: ociauth.decode_token_response(over, what="t"), "malformed token")


def test_challenge_length_and_parameters() -> None:
    head = 'Bearer realm="https://auth.example/token",service="'
    at = head + "s" * (ociauth.MAX_CHALLENGE_LEN - len(head) - 1) + '"'
    assert len(at) == ociauth.MAX_CHALLENGE_LEN
    assert ociauth.parse_challenges(at)[0].scheme == "bearer"
    refused(lambda: ociauth.parse_challenges(at + " "), "longer than 8192 characters")

    def params(n: int) -> str:
        return "Bearer " + ",".join(f'p{i}="v"' for i in range(n))

    assert len(ociauth.parse_challenges(params(ociauth.MAX_CHALLENGE_PARAMS))[0].params) == 32
    refused(
        lambda: ociauth.parse_challenges(params(ociauth.MAX_CHALLENGE_PARAMS + 1)),
        "too many parameters",
    )
    schemes = ", ".join(["Basic"] * ociauth.MAX_CHALLENGE_PARAMS)
    assert len(ociauth.parse_challenges(schemes)) == 32
    refused(lambda: ociauth.parse_challenges(schemes + ", Basic"), "too many schemes")


def test_image_reference_name_length(tmp_path: Path) -> None:
    repo = "a" * (ociref.MAX_NAME_LEN - len("example.com") - 1)
    assert ociref.parse_ref(f"example.com/{repo}:1", tmp_path).repository == repo
    refused(
        lambda: ociref.parse_ref(f"example.com/{repo}a:1", tmp_path),
        "name longer than 255 characters",
    )
    refused(
        lambda: ociref.parse_ref("a" * (ociref.MAX_REF_LEN + 1), tmp_path),
        "longer than 4096 characters",
    )


# --- monitor config and kernel image ------------------------------------------------------


def _config(**over: Any) -> dict[str, Any]:
    vm = VmConfig(
        kernel=Path("/k"), initrd=Path("/i"), rootfs=Path("/r"), cmdline="", memory=64 << 20
    )
    return {**MonitorConfig(vm, agent_fd=3, serial_log=Path("/s")).wire(), **over}


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_monitor_config_line_size() -> None:
    base = len(_line(_config()))
    at = _line(_config(cmdline="c" * (protocol.MAX_CONFIG - base)))
    assert len(at) == protocol.MAX_CONFIG
    assert MonitorConfig.decode(at).vm.cmdline.startswith("c")
    over = _line(_config(cmdline="c" * (protocol.MAX_CONFIG - base + 1)))
    refused(lambda: MonitorConfig.decode(over), "config line too long")


@pytest.mark.parametrize(
    ("field", "at", "over"),
    [
        ("vcpus", monitor_config.MAX_VCPUS, monitor_config.MAX_VCPUS + 1),
        ("memory", protocol.MAX_MEMORY, protocol.MAX_MEMORY + 4096),
        ("timeout", protocol.MAX_TIMEOUT, protocol.MAX_TIMEOUT * (1 + 1e-15)),
    ],
)
def test_monitor_config_ranges(field: str, at: float, over: float) -> None:
    assert getattr(MonitorConfig.decode(_line(_config(**{field: at}))).vm, field) == at
    refused(lambda: MonitorConfig.decode(_line(_config(**{field: over}))), field)


def test_monitor_config_snapshots_flag() -> None:
    """Absent (an older caller): snapshots allowed; otherwise exactly a boolean."""
    assert MonitorConfig.decode(_line(_config())).vm.snapshots is True
    assert MonitorConfig.decode(_line(_config(snapshots=False))).vm.snapshots is False
    doc = _config()
    del doc["snapshots"]
    assert MonitorConfig.decode(_line(doc)).vm.snapshots is True
    for bad in (0, 1, "false", None):
        line = _line(_config(snapshots=bad))
        refused(lambda: MonitorConfig.decode(line), "snapshots")  # noqa: B023 - called at once


def test_kernel_image_size(tmp_path: Path) -> None:
    """The monitor reads at most 256 MiB of kernel or initrd (sparse files: no disk used)."""
    at, over = tmp_path / "at", tmp_path / "over"
    for path, size in ((at, monitor.MAX_IMAGE), (over, monitor.MAX_IMAGE + 1)):
        with open(path, "wb") as fh:
            os.ftruncate(fh.fileno(), size)
    assert len(monitor._read_file(at, "kernel")) == monitor.MAX_IMAGE
    refused(lambda: monitor._read_file(over, "kernel"), "larger than 256 MiB")


# --- virtqueues ---------------------------------------------------------------------------


def test_virtqueue_size() -> None:
    mem = GuestMemory(RAM)
    try:
        q = Virtqueue(mem, MAX_QUEUE_SIZE)
        q.size = MAX_QUEUE_SIZE
        assert q.layout_error() is None
        q.size = MAX_QUEUE_SIZE + 1
        assert "power of 2 <= 256" in (q.layout_error() or "")
        with pytest.raises(ValueError):
            Virtqueue(mem, MAX_QUEUE_SIZE * 2)
    finally:
        mem.close()


@pytest.mark.parametrize("entries", [MAX_INDIRECT, MAX_INDIRECT + 1])
def test_indirect_table_entries(entries: int) -> None:
    mem = GuestMemory(RAM)
    try:
        alloc = Allocator(mem)
        dq = DriverQueue(mem, alloc, 8)
        q = Virtqueue(mem, 8)
        q.size, q.desc_addr, q.avail_addr, q.used_addr = 8, dq.desc, dq.avail, dq.used
        q.ready = q.indirect = True
        buf = alloc(16)
        dq.add_indirect([(buf, 1, True)] * entries, alloc)
        if entries <= MAX_INDIRECT:
            chain = q.pop()
            assert chain is not None and len(chain.writable) == entries
        else:
            with pytest.raises(ChainError, match="indirect table length 4112 invalid"):
                q.pop()
    finally:
        mem.close()


# --- layer tars (the same code path as the defaults, with small limits) -------------------


def _apply(tmp_path: Path, tag: str, tar: bytes, limits: Limits) -> Path:
    dest = tmp_path / f"root-{tag}"
    apply_layers(write_layers(tmp_path / f"blobs-{tag}", [tar]), dest, limits)
    return dest


def _tar_boundary(tmp_path: Path, at: bytes, over: bytes, limits: Limits, pattern: str) -> None:
    tag = str(len(list(tmp_path.glob("root-*"))))
    assert _apply(tmp_path, "at" + tag, at, limits).is_dir()
    refused(lambda: _apply(tmp_path, "over" + tag, over, limits), pattern)
    assert not (tmp_path / f"root-over{tag}").exists()  # nothing half-applied is left


def test_layer_entries(tmp_path: Path) -> None:
    n = 20
    _tar_boundary(
        tmp_path,
        make_tar([file(f"f{i}") for i in range(n)]),
        make_tar([file(f"f{i}") for i in range(n + 1)]),
        Limits(max_entries=n),
        f"more than {n} entries",
    )


def test_layer_file_bytes(tmp_path: Path) -> None:
    _tar_boundary(
        tmp_path,
        make_tar([file("a", b"x" * 600), file("b", b"y" * 424)]),
        make_tar([file("a", b"x" * 600), file("b", b"y" * 425)]),
        Limits(max_total_bytes=1024),
        "425 would exceed the limit of 1024",
    )


def test_layer_name_component_and_depth(tmp_path: Path) -> None:
    c = DEFAULT_LIMITS.max_component_bytes
    _tar_boundary(
        tmp_path,
        make_tar([file("a" * c)]),
        make_tar([file("a" * (c + 1))]),
        DEFAULT_LIMITS,
        "component of 256 bytes, over the limit of 255",
    )
    d = DEFAULT_LIMITS.max_depth
    _tar_boundary(
        tmp_path,
        make_tar([file("/".join(["d"] * d))]),
        make_tar([file("/".join(["d"] * (d + 1)))]),
        DEFAULT_LIMITS,
        "257 levels deep, over the limit of 256",
    )
    n = DEFAULT_LIMITS.max_name_bytes  # 4096 bytes of name in 200-byte components
    at = "/".join(["n" * 199] * 20) + "/" + "m" * (n - 20 * 200)
    assert len(at) == n
    _tar_boundary(
        tmp_path,
        make_tar([file(at)]),
        make_tar([file(at + "m")]),
        DEFAULT_LIMITS,
        "4097 bytes, over the limit of 4096",
    )
