"""Spores of a real Linux guest, end to end, as a user runs them (issue 4 acceptance).

One `spore build` cold-boots the managed kernel once (~15-20 s on kvm_pvm); everything
else resumes the sealed spore (~1-3 s each) or fails before a VM exists:

- a step's file in the overlay and a background process survive `spore run --from`,
  for each restore strategy (eager, lazy, local);
- two forked children report different generation ids and different /dev/urandom bytes,
  and two runs of one spore never read the same /dev/urandom bytes;
- a corrupt chunk, an edited manifest byte or a different kernel digest fail closed; a
  corrupt chunk in one line and within seconds for every strategy, also when it cannot
  be evicted;
- a restore checks rootfs blocks as the guest first reads them: a corrupt block fails
  that read with an I/O error and nothing else; a rootfs of another size, or one
  tampered under a spore sealed before block tables, fails before a VM;
- the unchanged Sporefile rebuilds without starting a VM;
- a spore of the previous device model (spore-board/1: the agent on /dev/hvc0), sealed
  here through the VMM's own API, restores and forks.

Guest commands are single processes or `sh -c` with builtins (docs/vmm.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sporevm.spore import manifest
from sporevm.spore.backing import memfile_path
from sporevm.spore.chunks import CHUNK
from sporevm.store import Store
from tests.conftest import PushedImage, immutable
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)
from tests.test_vm_e2e import busybox_rootfs, spore  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

SPOREFILE = """\
sporefile: 1
name: stateful
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
env: {{TOKEN: "{token}"}}
files:
  - {{src: blob, dst: /data/blob}}
steps:
  - name: write
    run: echo "state $TOKEN" > /root/state.txt
  - name: daemon
    run: [sleep, "100000"]
    background: true
    ready: {{command: [pidof, sleep], timeout: 30s}}
  - name: pid
    run: [pidof, sleep]
"""

# Builtins only: the overlay file's line, then every live `sleep` as "sleep /proc/PID".
CHECK = (
    'read -r s < /root/state.txt; echo "$s"; '
    'for f in /proc/[0-9]*/comm; do read -r c < "$f" && [ "$c" = sleep ] && '
    'echo "sleep ${f%/comm}"; done; true'
)

# generation.json through builtins, a separator, then one process reading /dev/urandom.
GEN_AND_RANDOM = (
    'while IFS= read -r l || [ -n "$l" ]; do echo "$l"; done '
    "< /run/spore/generation.json; echo ---; "
    'exec hexdump -n 16 -e \'16/1 "%02x" "\\n"\' /dev/urandom'
)

TIMES: dict[str, float] = {}
# /data/blob in the rootfs, never read while building: its blocks reach the guest
# only through the blk device, so a corrupt one shows there (the lazy rootfs check).
BLOB = b"".join(i.to_bytes(4, "little") * 1024 for i in range(256))  # 1 MiB


def child_generation(child: dict[str, Any], label: str) -> tuple[dict[str, Any], str]:
    """`spore run --from` a forked child: its generation.json and 16 random bytes (hex)."""
    proc = timed(label, "run", "-q", "--from", child["path"], "--", "sh", "-c", GEN_AND_RANDOM)
    assert proc.returncode == 0, proc.stderr
    gen_text, _, random_text = proc.stdout.partition("---\n")
    assert re.fullmatch(r"[0-9a-f]{32}\n", random_text), proc.stdout
    info: dict[str, Any] = json.loads(gen_text)
    return info, random_text


def timed(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    proc = spore(*args)
    TIMES[name] = time.monotonic() - started
    return proc


@dataclass(frozen=True)
class Built:
    sporefile: Path
    spore_dir: Path
    token: str
    pid: int


@pytest.fixture(scope="module")
def built(
    busybox_image: PushedImage,
    busybox_rootfs: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Built]:
    # A fresh token gives fresh step keys (the kernel store is shared between runs).
    token = uuid.uuid4().hex
    ctx = tmp_path_factory.mktemp("stateful")
    (ctx / "blob").write_bytes(BLOB)
    (ctx / "Sporefile").write_text(SPOREFILE.format(layout=busybox_image.layout, token=token))
    proc = timed("spore build (cold boot, 3 steps, snapshot)", "build", str(ctx / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.index("step:write") < proc.stderr.index("step:daemon")
    m = re.search(r"pid \| (\d+)", proc.stderr)  # the step's output, streamed
    assert m, proc.stderr
    spore_dir = ctx / "out" / "stateful.spore"  # the default output.spore
    assert (spore_dir / "manifest.json").is_file()
    yield Built(ctx / "Sporefile", spore_dir, token, int(m.group(1)))
    print("\nwall times (s):")
    for name, secs in TIMES.items():
        print(f"  {secs:7.2f}  {name}")


@contextmanager
def flipped(path: Path, offset: int) -> Iterator[None]:
    """Flip one byte of a store file in place; put the original back afterwards.

    A restore that finds a corrupt chunk evicts it from the store, so "back" may
    mean recreating the file (with its mode).
    """
    original, mode = path.read_bytes(), path.stat().st_mode & 0o7777
    try:
        path.write_bytes(
            original[:offset] + bytes([original[offset] ^ 0x5A]) + original[offset + 1 :]
        )
        yield
    finally:
        path.unlink(missing_ok=True)
        path.write_bytes(original)
        path.chmod(mode)


def chunk_file(cid: str) -> Path:
    return KERNEL_STORE / "chunks" / "blake3" / cid.split(":", 1)[1]


def load_manifest(spore_dir: Path) -> manifest.Manifest:
    return manifest.decode((spore_dir / "manifest.json").read_bytes())


def copy_spore(spore_dir: Path, dest: Path) -> Path:
    shutil.copytree(spore_dir, dest)
    return dest


@pytest.mark.parametrize("strategy", ["eager", "lazy", "local"])
def test_file_and_background_process_survive_restore(built: Built, strategy: str) -> None:
    proc = timed(
        f"spore run --from --restore {strategy}",
        "run",
        "-q",
        "--from",
        str(built.spore_dir),
        "--restore",
        strategy,
        "--",
        "sh",
        "-c",
        CHECK,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"state {built.token}"
    # The very process the build started (same pid) is alive after the resume.
    assert lines[1:] == [f"sleep /proc/{built.pid}"], proc.stdout


def test_forked_children_know_they_forked(built: Built, tmp_path: Path) -> None:
    forks = timed(
        "spore fork --count 2",
        "fork",
        str(built.spore_dir),
        "--count",
        "2",
        "--out",
        str(tmp_path / "forks"),
        "--json",
    )
    assert forks.returncode == 0, forks.stderr
    doc = json.loads(forks.stdout)
    assert len(doc["children"]) == 2
    gens, randoms = [], []
    for child in doc["children"]:
        info, random_text = child_generation(child, f"spore run --from child {child['index']}")
        assert info["generation"] == child["generation"] and info["index"] == child["index"]
        assert info["parent"] == doc["parent"] and info["count"] == 2
        gens.append(info["generation"])
        randoms.append(random_text)
    assert len(set(gens)) == 2
    assert randoms[0] != randoms[1]  # same state, same read, fresh entropy per child


def test_each_restore_of_one_spore_reads_fresh_random_bytes(built: Built) -> None:
    # A fleet resumes one spore thousands of times: no two runs may share the
    # guest's CRNG stream, forked or not.
    gen_id = load_manifest(built.spore_dir).generation.id
    randoms = []
    for run in range(2):
        proc = timed(
            f"spore run --from (again {run})",
            "run",
            "-q",
            "--from",
            str(built.spore_dir),
            "--",
            "sh",
            "-c",
            GEN_AND_RANDOM,
        )
        assert proc.returncode == 0, proc.stderr
        gen_text, _, random_text = proc.stdout.partition("---\n")
        info = json.loads(gen_text)
        assert (info["generation"], info["parent"], info["count"]) == (gen_id, "", 1)
        assert info["entropy_bytes"] > 0
        assert re.fullmatch(r"[0-9a-f]{32}\n", random_text), proc.stdout
        randoms.append(random_text)
    assert randoms[0] != randoms[1]


def chunks_a_restore_reads(m: manifest.Manifest, strategy: str) -> list[str]:
    """Stored chunks to corrupt so that a ``strategy`` restore must read one of them.

    Eager and local read every chunk before the VM exists: one will do. Lazy reads only
    what the guest touches; the guest's kernel image sits in the low chunks, which any
    resume touches: every stored chunk of the first 64 MiB.
    """
    if strategy == "lazy":
        return sorted({cid for cid in m.memory.chunks[:32] if cid})
    return [next(c for c in m.memory.chunks if c)]


@contextmanager
def leaves_nothing_behind(runtime: Path) -> Iterator[None]:
    """No VM runtime dir (XDG_RUNTIME_DIR=runtime) nor monitor staging dir outlives a run.

    Staging dirs are ``monitor-<pid>-<hex>``; one of a live process belongs to another
    command sharing the test store, not to the run under test (whose monitor is gone).
    """
    staging = KERNEL_STORE / "tmp"
    before = set(staging.glob("monitor-*"))
    yield
    assert list(runtime.iterdir()) == []
    left = [
        d
        for d in set(staging.glob("monitor-*")) - before
        if not Path("/proc", d.name.split("-")[1]).exists()
    ]
    assert left == [], left


def assert_one_line_naming(proc: subprocess.CompletedProcess[str], cids: list[str]) -> str:
    """A failed command's whole stderr: one ``spore: error:`` line naming a chunk."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spore: error: "), proc.stderr
    assert any(cid in lines[0] for cid in cids), proc.stderr
    return lines[0]


@pytest.mark.parametrize("evictable", [True, False], ids=["evicted", "immutable"])
@pytest.mark.parametrize("strategy", ["eager", "lazy", "local"])
def test_corrupt_chunk_fails_fast_in_one_line(
    built: Built, strategy: str, evictable: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every strategy refuses a corrupt chunk with one line naming it and what to do,
    within seconds: no traceback, no VM running on it, nothing left behind. Also when
    the corrupt entry cannot be evicted (issue 11: eager died on a BufferError over
    the ChunkError; lazy's pager thread died and the vCPU waited for the 60 s timeout)."""
    m = load_manifest(built.spore_dir)
    # local: drop any memfile (a cache) so this restore must build it from the chunks.
    memfile_path(m.memory, Store(KERNEL_STORE)).unlink(missing_ok=True)
    cids = chunks_a_restore_reads(m, strategy)
    paths = [chunk_file(cid) for cid in cids]
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with (
        contextmanager_all(paths),
        immutable([] if evictable else paths),
        leaves_nothing_behind(runtime),
    ):
        started = time.monotonic()
        proc = timed(
            f"corrupt chunk, --restore {strategy}, "
            f"{'evictable' if evictable else 'immutable'} (fails)",
            "run",
            "--from",
            str(built.spore_dir),
            "--restore",
            strategy,
            "--",
            "echo",
            "RAN",
        )
        took = time.monotonic() - started
        still_there = [p.exists() for p in paths]
    line = assert_one_line_naming(proc, cids)
    assert "does not match its id (corrupt)" in line, line
    assert "pull or unpack the spore again" in line, line  # what to do
    if evictable:
        assert "evicted it" in line and not all(still_there), line
    else:
        assert "could not be evicted (Operation not permitted)" in line, line
        assert all(still_there)
    if strategy == "lazy":
        assert "lazy restore: guest RAM chunk" in line, line
    assert "RAN" not in proc.stdout
    # The bug this guards against waited for the 60 s lazy-fault timeout; a bound well
    # under it, not a speed goal (the hardware-KVM lane runs this under nested TCG, with
    # fuzzers beside it, where a CLI start alone takes seconds: 22 s seen once).
    assert took < 45, f"{took:.1f} s: the failure must end the VM at once, not time out"


def test_verify_names_a_corrupt_chunk_it_cannot_evict(built: Built) -> None:
    m = load_manifest(built.spore_dir)
    (cid,) = chunks_a_restore_reads(m, "eager")
    with contextmanager_all([chunk_file(cid)]), immutable([chunk_file(cid)]):
        proc = timed(
            "spore verify, immutable corrupt chunk (fails)", "verify", str(built.spore_dir)
        )
    line = assert_one_line_naming(proc, [cid])
    assert "could not be evicted (Operation not permitted)" in line, line


def test_corrupt_memfile_fails_and_is_rebuilt(built: Built) -> None:
    m = load_manifest(built.spore_dir)
    ok = spore("run", "-q", "--from", str(built.spore_dir), "--restore", "local", "--", "true")
    assert ok.returncode == 0, ok.stderr
    path = memfile_path(m.memory, Store(KERNEL_STORE))
    c, cid = next((c, cid) for c, cid in enumerate(m.memory.chunks) if cid)
    with flipped(path, c * CHUNK + 4096 + 7):
        proc = timed(
            "corrupt memfile, --restore local (fails)",
            "run",
            "--from",
            str(built.spore_dir),
            "--restore",
            "local",
            "--",
            "echo",
            "RAN",
        )
    assert proc.returncode != 0
    assert cid.split(":", 1)[1][:12] in proc.stderr, proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr
    again = spore(
        "run", "-q", "--from", str(built.spore_dir), "--restore", "local", "--", "sh", "-c", CHECK
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"state {built.token}"


@contextmanager
def contextmanager_all(paths: list[Path]) -> Iterator[None]:
    if not paths:
        yield
        return
    with flipped(paths[0], 4096 + 7), contextmanager_all(paths[1:]):
        yield


def test_edited_manifest_byte_fails_clearly(built: Built, tmp_path: Path) -> None:
    bad = copy_spore(built.spore_dir, tmp_path / "edited.spore")
    data = (bad / "manifest.json").read_bytes()
    m = re.search(rb'"memory":(\d+)', data)
    assert m
    at = m.end(1) - 1  # the last digit of platform.memory
    data = data[:at] + (b"1" if data[at : at + 1] != b"1" else b"3") + data[at + 1 :]
    (bad / "manifest.json").write_bytes(data)
    proc = timed("edited manifest byte (fails)", "run", "--from", str(bad), "--", "echo", "RAN")
    assert proc.returncode != 0
    assert "manifest.json: manifest id is" in proc.stderr and "expected" in proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("site", [b'"org.spore.name":"', b'"generation":{"count":1,"id":"'])
def test_any_edited_byte_fails_on_the_manifest_id(
    built: Built, tmp_path: Path, site: bytes
) -> None:
    """Even fields the restore does not use: the spore's id file covers every byte."""
    bad = copy_spore(built.spore_dir, tmp_path / "edited.spore")
    data = (bad / "manifest.json").read_bytes()
    assert site in data
    at = data.index(site) + len(site)
    data = data[:at] + (b"x" if data[at : at + 1] != b"x" else b"y") + data[at + 1 :]
    (bad / "manifest.json").write_bytes(data)
    proc = spore("run", "--from", str(bad), "--", "echo", "RAN")
    assert proc.returncode != 0 and "manifest id is" in proc.stderr, proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr


def test_pinned_id_must_match(built: Built) -> None:
    wrong = "blake3:" + "0" * 64
    proc = spore("run", "--from", f"{built.spore_dir}@{wrong}", "--", "echo", "RAN")
    assert proc.returncode != 0 and f"expected {wrong}" in proc.stderr, proc.stderr


def reseal(spore_dir: Path) -> None:
    """Rewrite the id file to match the (edited) manifest: what a careless or hostile
    producer would ship; the deeper checks must still refuse it."""
    data = (spore_dir / "manifest.json").read_bytes()
    (spore_dir / "id").write_text(manifest.manifest_id(data) + "\n")


# One byte of a field the restore depends on; each fails in about a second.
@pytest.mark.parametrize(
    ("site", "named"),
    [
        (b'"chunks":["blake3:', "memory chunk 0 (blake3:"),  # → not in the store
        (b'"vm":{"digest":"blake3:', "is not in the store"),  # the vCPU/device state
        (b'"rootfs":{"blk_slot":0,"builder":"spore-rootfs/1","digest":"blake3:', "rootfs blake3:"),
        (b'"cmdline":"console=', "platform.cmdline"),
        (b'"format":"spore/v', "format 'spore/v"),
    ],
)
def test_edited_manifest_field_fails_clearly(
    built: Built, tmp_path: Path, site: bytes, named: str
) -> None:
    bad = copy_spore(built.spore_dir, tmp_path / "edited.spore")
    data = (bad / "manifest.json").read_bytes()
    assert site in data
    at = data.index(site) + len(site)
    data = data[:at] + (b"2" if data[at : at + 1] != b"2" else b"3") + data[at + 1 :]
    (bad / "manifest.json").write_bytes(data)
    reseal(bad)
    proc = spore("run", "--from", str(bad), "--", "echo", "RAN")
    assert proc.returncode != 0
    assert named in proc.stderr, proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr


def test_different_kernel_digest_fails_naming_the_field(built: Built, tmp_path: Path) -> None:
    bad = copy_spore(built.spore_dir, tmp_path / "kernel.spore")
    m = load_manifest(bad)
    other = dataclasses.replace(
        m, platform=dataclasses.replace(m.platform, kernel="blake3:" + "0" * 64)
    )
    (bad / "manifest.json").write_bytes(manifest.encode(other))
    reseal(bad)
    proc = timed("different kernel digest (fails)", "run", "--from", str(bad), "--", "echo", "RAN")
    assert proc.returncode != 0
    assert "platform.kernel" in proc.stderr, proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr


def rootfs_file(m: manifest.Manifest) -> Path:
    return KERNEL_STORE / "rootfs" / "blake3" / m.rootfs.digest.split(":", 1)[1]


def image_offset(image: Path, guest_path: str, file_offset: int) -> int:
    """Where byte ``file_offset`` of ``guest_path`` lies in the ext4 image (debugfs bmap)."""
    fs_block = 4096  # rootfs.BLOCK
    out = subprocess.run(
        ["debugfs", "-R", f"bmap {guest_path} {file_offset // fs_block}", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[-1]) * fs_block + file_offset % fs_block


def test_corrupt_rootfs_block_fails_the_guests_read_not_the_vm(built: Built) -> None:
    """Lazy rootfs verification: a restore does not hash the image; the blk device checks
    each block on first read. One flipped byte in the store's image after sealing: the
    guest's read of that block fails with an I/O error (its bytes never served), reads
    of other blocks succeed, the VM runs on, and the block is reported in one line."""
    m = load_manifest(built.spore_dir)
    assert m.rootfs.table is not None, "a freshly built spore has a block table"
    path = rootfs_file(m)
    at = image_offset(path, "/data/blob", 512 << 10)
    block = at // m.rootfs.table.block_size
    script = (
        "cat /data/blob >/dev/null; echo cat=$?; "
        "dd if=/data/blob of=/dev/null bs=4096 skip=224 count=1 2>/dev/null && echo dd-ok; "
        'read -r s < /root/state.txt; echo "$s"'
    )
    with flipped(path, at):
        proc = timed(
            "corrupt rootfs block, guest reads it (I/O error)",
            "run",
            "--from",
            str(built.spore_dir),
            "--",
            "sh",
            "-c",
            script,
        )
    assert proc.returncode == 0, proc.stderr
    assert "cat=1" in proc.stdout, proc.stdout + proc.stderr
    assert "dd-ok" in proc.stdout, proc.stdout + proc.stderr  # another block: served
    assert f"state {built.token}" in proc.stdout  # the VM ran on
    assert re.search(r"(?i)i/o error", proc.stderr), proc.stderr  # the guest's cat said so
    warnings = [ln for ln in proc.stderr.splitlines() if "does not match" in ln]
    assert len(warnings) == 1 and f"rootfs block {block} " in warnings[0], proc.stderr
    # Unchanged image: the same spore reads the whole file (no block stays marked bad).
    proc = timed(
        "restore, guest reads /data/blob whole",
        "run",
        "--from",
        str(built.spore_dir),
        "--",
        "sh",
        "-c",
        "cat /data/blob >/dev/null; echo cat=$?",
    )
    assert proc.returncode == 0 and "cat=0" in proc.stdout, proc.stdout + proc.stderr


def test_rootfs_of_another_size_fails_before_a_vm(built: Built) -> None:
    """The monitor compares the opened image's size with the manifest before any VM."""
    m = load_manifest(built.spore_dir)
    path = rootfs_file(m)
    original, mode = path.read_bytes(), path.stat().st_mode & 0o7777
    try:
        path.write_bytes(original + b"\0")
        proc = timed(
            "extended rootfs (fails)", "run", "--from", str(built.spore_dir), "--", "echo", "RAN"
        )
    finally:
        path.unlink(missing_ok=True)
        path.write_bytes(original)
        path.chmod(mode)
    assert proc.returncode != 0
    assert f"is {m.rootfs.size + 1} B; the spore needs {m.rootfs.digest}" in proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr


def test_spore_without_a_block_table_is_hashed_whole(built: Built, tmp_path: Path) -> None:
    """A spore sealed before block tables (no rootfs.table) still restores, its image
    hashed whole before the VM as it always was: one flipped byte fails before the VM."""
    from sporevm.spore.sporedir import write_spore

    m = load_manifest(built.spore_dir)
    old = dataclasses.replace(m, rootfs=dataclasses.replace(m.rootfs, table=None))
    out = tmp_path / "old.spore"
    write_spore(old, out)
    proc = timed("spore without a block table", "run", "--from", str(out), "--", "echo", "RAN")
    assert proc.returncode == 0 and "RAN" in proc.stdout, proc.stderr
    with flipped(rootfs_file(m), m.rootfs.size // 2):
        proc = timed(
            "spore without a block table, tampered rootfs (fails)",
            "run",
            "--from",
            str(out),
            "--",
            "echo",
            "RAN",
        )
    assert proc.returncode != 0
    assert "rootfs" in proc.stderr and f"needs {m.rootfs.digest}" in proc.stderr, proc.stderr
    assert "RAN" not in proc.stdout and "resumed" not in proc.stderr, proc.stderr


def test_unchanged_sporefile_rebuilds_without_a_vm(built: Built) -> None:
    proc = timed("spore build again (up to date)", "build", "--json", str(built.sporefile))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["tasks"].values()) == {"up-to-date"}, doc["tasks"]
    assert Path(doc["spore"]) == built.spore_dir

    # Cheap to decide: neither a hypervisor module nor jsonschema is loaded to find
    # that nothing changed (cached.py and publish.py read only bytes whose ids the
    # store recorded; the Sporefile's schema verdict is remembered by content).
    probe = (
        "import sys; from sporevm.cli import main; code = main(sys.argv[1:]); "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('jsonschema', 'sporevm.vmm', 'sporevm.runtime')))); sys.exit(code)"
    )
    loaded = spore_probe(probe, "build", "--json", str(built.sporefile))
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().splitlines()[-1] == "[]", loaded.stdout

    # A bundle whose metadata was edited is not the recorded one: packed again.
    bundle = Path(doc["bundle"])
    index = bundle / "chunkpack.index.json"
    original = index.read_bytes()
    try:
        index.write_bytes(original.replace(b'"', b" ", 1))
        redo = spore("build", "--json", str(built.sporefile))
        assert redo.returncode == 0, redo.stderr
        tasks = json.loads(redo.stdout)["tasks"]
        assert tasks["bundle"] == "executed" and tasks["verify"] == "up-to-date", tasks
        assert index.read_bytes() == original  # same spore, same bytes
    finally:
        if index.read_bytes() != original:
            index.write_bytes(original)


def spore_probe(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPORE_HOME": str(KERNEL_STORE)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_until_guest_on_a_new_project_needs_no_lock(
    busybox_image: PushedImage,  # noqa: F811
    tmp_path: Path,
) -> None:
    """--until guest stops before resolve: no lock entry, no image, and no crash."""
    (tmp_path / "blob").write_bytes(BLOB)
    (tmp_path / "Sporefile").write_text(
        SPOREFILE.format(layout=busybox_image.layout, token="until-guest")
    )
    proc = spore("build", "--until", "guest", str(tmp_path / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    assert "stopped after guest" in proc.stderr and "image " not in proc.stderr


def test_guest_clock_stands_still_while_the_spore_sleeps(built: Built) -> None:
    """Monotonic time resumes where it was captured (wall time is set by the agent)."""

    def uptime() -> float:
        proc = spore("run", "--from", str(built.spore_dir), "--", "cat", "/proc/uptime")
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.split()[0])

    first = uptime()
    time.sleep(6)
    second = uptime()
    # Each run lives ~1-2 s and starts from the same captured clock: asleep time never
    # shows up (a TSC clocksource on kvm_pvm added the 6 s and more).
    assert abs(second - first) < 3, (first, second)


def seal_legacy_spore(built: Built, out: Path) -> Path:
    """A spore of the previous device model, ``spore-board/1``, made as that release made
    one: a fresh boot on the single-port console (the agent on ``/dev/hvc0``), a file
    written by a command, then RAM and state sealed under a manifest naming /1."""
    import threading

    from sporevm.build.guest import lookup_guest
    from sporevm.runtime.agent_session import AgentSession, QueueChannel
    from sporevm.runtime.capture import capture
    from sporevm.spore import vmstate
    from sporevm.spore.chunks import ChunkStore, snapshot_memory
    from sporevm.spore.sporedir import write_spore
    from sporevm.vmm.board import BoardConfig, BoardWiring, build_board
    from sporevm.vmm.machine import ExitResult, StopReason

    store = Store(KERNEL_STORE)
    guest = lookup_guest(store)
    assert guest is not None  # the build fixture made it
    m = load_manifest(built.spore_dir)
    assert (m.platform.kernel, m.platform.cmdline) == (guest.kernel_digest, guest.cmdline)
    serial = bytearray()
    fd = os.open(rootfs_file(m), os.O_RDONLY | os.O_CLOEXEC)
    try:
        cfg = BoardConfig(
            m.platform.memory,
            m.platform.vcpus,
            guest.cmdline,
            fd,
            os.fstat(fd).st_size,
            legacy_console=True,
        )
        board = build_board(
            cfg,
            BoardWiring(
                on_agent_output=lambda data: chan.feed(data),
                on_agent_writable=lambda: chan.writable(),
                serial_output=serial.extend,
            ),
        )
        chan = QueueChannel(board.console.send)
        machine = board.machine
        with machine:
            assert "spore.agent=/dev/hvc0" in board.cmdline  # what the /1 guest was told
            machine.load_kernel(
                guest.kernel.read_bytes(),
                board.cmdline,
                guest.initrd.read_bytes(),
                rng_seed=os.urandom(32),
            )
            outcome: list[ExitResult | BaseException] = []

            def run() -> None:
                try:
                    outcome.append(machine.run(time.monotonic() + 600))
                except BaseException as e:  # surfaced below on the test thread
                    outcome.append(e)
                finally:
                    chan.feed(b"")  # hang-up: a waiting session fails at once

            th = threading.Thread(target=run, name="legacy-vm")
            th.start()
            try:
                session = AgentSession(chan, grace=30.0)
                session.wait_ready(300)
                h = session.exec(f"echo legacy {built.token} > /root/legacy.txt", timeout=60)
                assert h.wait().returncode == 0
            finally:
                machine.pause()
                th.join(60)
            assert not th.is_alive()
            (res,) = outcome
            assert isinstance(res, ExitResult) and res.reason is StopReason.PAUSED, (
                res,
                serial[-2000:].decode(errors="replace"),
            )
            assert not board.console.multiport  # the guest drove the /1 console
            state = vmstate.encode(capture(machine, board.transports))
            chunks = ChunkStore(store)
            with machine.ram.view(0, machine.ram.size) as ram:
                index = snapshot_memory(ram, chunks)
            state_id = chunks.put(state)
    finally:
        os.close(fd)
    legacy = dataclasses.replace(
        m,
        platform=dataclasses.replace(m.platform, device_model="spore-board/1"),
        memory=index,
        state={"vm": manifest.StateObject(state_id, len(state))},
        generation=manifest.Generation(str(uuid.uuid4()), None, 0, 1),
        annotations={"org.spore.name": "legacy"},
    )
    write_spore(legacy, out)
    return out


def test_spore_of_the_previous_device_model_restores_and_forks(
    built: Built, tmp_path: Path
) -> None:
    """Spores sealed before the multiport console (spore-board/1) keep working: the
    monitor rebuilds their board with the /1 console, and the guest's open /dev/hvc0
    carries the agent again, restored and forked."""
    out = seal_legacy_spore(built, tmp_path / "legacy.spore")
    state = json.loads(chunk_file(load_manifest(out).state["vm"].digest).read_bytes())
    assert set(state["devices"]["virtio"][1]["device"]) == {"pending", "tx_paused"}
    proc = timed(
        "spore run --from (spore-board/1)",
        "run",
        "-q",
        "--from",
        str(out),
        "--",
        "sh",
        "-c",
        "read -r s < /root/legacy.txt; echo $s",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"legacy {built.token}\n"

    forks = timed(
        "spore fork (spore-board/1)",
        "fork",
        str(out),
        "--count",
        "2",
        "--out",
        str(tmp_path / "forks"),
        "--json",
    )
    assert forks.returncode == 0, forks.stderr
    doc = json.loads(forks.stdout)
    child = doc["children"][1]
    assert load_manifest(Path(child["path"])).platform.device_model == "spore-board/1"
    info, _ = child_generation(child, "spore run --from fork child (spore-board/1)")
    assert (info["generation"], info["index"], info["count"]) == (child["generation"], 1, 2)
