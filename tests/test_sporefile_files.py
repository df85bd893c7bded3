"""Sporefile ``files:``: a deterministic synthetic layer applied path-safely on the image.

Unit tests load real Sporefiles and apply real layers (as root, like the build);
the CLI tests build rootfs images from an offline OCI layout (no registry); the
last test boots a busybox guest that reads the copied file in a step.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import blake3
import ociimage  # tools/, on sys.path via conftest (as in test_oci.py)
import pytest

from sporevm import sporefile
from sporevm.build.cachekeys import ROOTFS_BUILDER, rootfs_key
from sporevm.build.fileslayer import MEDIA_TYPE, FilesLayer, files_layer
from sporevm.build.layers import Layer, apply_layers
from sporevm.build.oci import ResolvedImage
from sporevm.build.ocimanifest import LayerDesc
from sporevm.build.rootfs import ROOTFS_EPOCH, tool_versions
from sporevm.errors import LayerError, SporefileError
from tests.ext4mount import mounted_ro

HEAD = "sporefile: 1\nname: t\nbase: {image: oci-layout:/nonexistent:latest}\n"


def make_context(ctx: Path) -> None:
    """hello.txt (0644), app/ with a nested dir, an executable and a setuid file."""
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "hello.txt").write_text("hello from the context\n")
    (ctx / "app" / "main.py").write_text("print('hi')\n")
    (ctx / "app" / "sub" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (ctx / "app" / "sub" / "suid").write_bytes(b"x")
    os.chmod(ctx / "hello.txt", 0o644)
    os.chmod(ctx / "app", 0o750)
    os.chmod(ctx / "app" / "sub", 0o755)
    os.chmod(ctx / "app" / "main.py", 0o600)
    os.chmod(ctx / "app" / "sub" / "run.sh", 0o755)
    os.chmod(ctx / "app" / "sub" / "suid", 0o4755)


def layer_for(ctx: Path, files_yaml: str) -> FilesLayer:
    path = ctx / "Sporefile"
    path.write_text(HEAD + files_yaml)
    sf = sporefile.load(path)
    layer = files_layer(sf.files, sf.context, sf.path, (sf.output.spore, sf.output.bundle))
    assert layer is not None
    return layer


def tar_bytes(layer: FilesLayer) -> bytes:
    buf = io.BytesIO()
    layer.write(buf)
    return buf.getvalue()


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


APP_FILES = """\
files:
  - {src: hello.txt, dst: /opt/app/hello.txt, mode: "0640"}
  - {src: app, dst: /srv/app}
"""


def test_layer_is_deterministic_and_pinned(tmp_path: Path) -> None:
    make_context(tmp_path / "a")
    a = tar_bytes(layer_for(tmp_path / "a", APP_FILES))
    assert a == tar_bytes(layer_for(tmp_path / "a", APP_FILES))  # two builds, same bytes
    # Another checkout: created in another order, other mtimes, other path: same bytes.
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)
    os.utime(tmp_path / "b" / "hello.txt", (1, 1))
    b_layer = layer_for(tmp_path / "b", APP_FILES)
    assert tar_bytes(b_layer) == a
    assert b_layer.digest() == "sha256:" + hashlib.sha256(a).hexdigest()
    got = members(a)
    # Sorted, parents first; only what files: names (parents are left to the image).
    assert list(got) == [
        "opt/app/hello.txt",
        "srv/app",
        "srv/app/main.py",
        "srv/app/sub",
        "srv/app/sub/run.sh",
        "srv/app/sub/suid",
    ]
    for m in got.values():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (ROOTFS_EPOCH, 0, 0, "", "")
        assert m.isdir() or m.isfile()


def test_modes(tmp_path: Path) -> None:
    make_context(tmp_path)
    got = members(tar_bytes(layer_for(tmp_path, APP_FILES)))
    assert got["opt/app/hello.txt"].mode == 0o640  # mode: wins over the source's 0644
    assert got["srv/app"].mode == 0o750  # source permission bits
    assert got["srv/app/main.py"].mode == 0o600
    assert got["srv/app/sub/run.sh"].mode == 0o755
    assert got["srv/app/sub/suid"].mode == 0o755  # setuid is never taken from the host
    forced = members(
        tar_bytes(
            layer_for(
                tmp_path,
                """\
files:
  - {src: app, dst: /srv/app, mode: "4750"}
""",
            )
        )
    )
    assert {m.mode for m in forced.values()} == {0o4750}  # a directory's mode: covers all


def test_contents_and_the_applied_tree(tmp_path: Path) -> None:
    make_context(tmp_path / "ctx")
    layer = layer_for(tmp_path / "ctx", APP_FILES + "  - {src: hello.txt, dst: /tmp/x}\n")
    base = tmp_path / "base.tar"
    base.write_bytes(ociimage.tar_layer({"tmp": None, "srv": None}))
    # the base's /tmp is 1777: a file copied into it must not change that
    with tarfile.open(fileobj=io.BytesIO(base.read_bytes())) as tf:
        entries = tf.getmembers()
    entries[1].mode = 0o1777
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in entries:
            tf.addfile(m)
    base.write_bytes(out.getvalue())
    tree = apply(tmp_path, base, layer)
    assert (tree / "opt/app/hello.txt").read_text() == "hello from the context\n"
    assert (tree / "tmp/x").read_text() == "hello from the context\n"
    assert stat.S_IMODE((tree / "tmp").stat().st_mode) == 0o1777
    assert (tree / "srv/app/sub/run.sh").read_text() == "#!/bin/sh\necho run\n"
    assert stat.S_IMODE((tree / "opt").stat().st_mode) == 0o755  # implied parent
    st = (tree / "srv/app/main.py").stat()
    assert (st.st_uid, st.st_gid, st.st_mtime) == (0, 0, ROOTFS_EPOCH)


def apply(tmp_path: Path, base: Path, layer: FilesLayer) -> Path:
    blob = tmp_path / "files.tar"
    blob.unlink(missing_ok=True)
    digest, _ = layer.write_file(blob)
    tree = tmp_path / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    base_digest = "sha256:" + hashlib.sha256(base.read_bytes()).hexdigest()
    layers = [Layer(base_digest, MEDIA_TYPE, base), Layer(digest, MEDIA_TYPE, blob)]
    try:
        apply_layers(layers, tree)
    except LayerError as exc:
        named = layer.explain(exc, len(layers))
        raise named if named is not None else exc from None
    return tree


@pytest.mark.parametrize("target", ["/etc", "OUTSIDE"])
def test_symlink_in_the_base_image_is_never_written_through(tmp_path: Path, target: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    make_context(tmp_path / "ctx")
    layer = layer_for(
        tmp_path / "ctx",
        """\
files:
  - {src: app, dst: /srv/app}
  - {src: hello.txt, dst: /app/x}
""",
    )
    base = tmp_path / "base.tar"
    link = str(outside) if target == "OUTSIDE" else target
    base.write_bytes(ociimage.tar_layer({"etc": None, "app": link}))
    with pytest.raises(SporefileError) as err:
        apply(tmp_path, base, layer)
    msg = str(err.value)
    assert "\n" not in msg
    assert "files[1].dst:" in msg and "'app' is a symlink" in msg, msg
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "tree").exists()  # the applier removed its partial tree
    # Replacing the link itself is fine: it is removed, never followed.
    layer = layer_for(tmp_path / "ctx", "files:\n  - {src: hello.txt, dst: /app}\n")
    tree = apply(tmp_path, base, layer)
    assert (tree / "app").is_file() and not (tree / "app").is_symlink()
    assert list(outside.iterdir()) == [] and list((tree / "etc").iterdir()) == []


def test_symlink_in_a_copied_directory_is_refused(tmp_path: Path) -> None:
    make_context(tmp_path)
    os.symlink("/etc/passwd", tmp_path / "app" / "sub" / "passwd")
    layer = layer_for(tmp_path, "files:\n  - {src: hello.txt, dst: /h}\n  - {src: app, dst: /a}\n")
    with pytest.raises(SporefileError, match=r"files\[1\]\.src: \"app/sub/passwd\" is a symlink"):
        layer.digest()


def test_source_swapped_for_a_symlink_after_loading_is_refused(tmp_path: Path) -> None:
    make_context(tmp_path)
    layer = layer_for(tmp_path, "files:\n  - {src: app/sub/run.sh, dst: /r}\n")
    shutil.rmtree(tmp_path / "app" / "sub")
    os.symlink("/etc", tmp_path / "app" / "sub")
    with pytest.raises(SporefileError, match=r"files\[0\]\.src: .*without following a symlink"):
        layer.digest()


@pytest.mark.parametrize(
    ("files_yaml", "problem"),
    [
        (
            "  - {src: hello.txt, dst: /x}\n  - {src: app, dst: /x}\n",
            r"files\[1\]\.dst: \"/x\" is a dir here but files\[0\] puts a file there",
        ),
        (
            "  - {src: hello.txt, dst: /x}\n  - {src: hello.txt, dst: /x/y}\n",
            r"files\[1\]\.dst: \"/x/y\" needs a directory where files\[0\] puts a file",
        ),
        (
            "  - {src: app, dst: /x}\n  - {src: hello.txt, dst: /x/sub}\n",
            r"files\[1\]\.dst: \"/x/sub\" is a file here but files\[0\] puts a dir there",
        ),
        (
            "  - {src: hello.txt, dst: /x/y/z}\n  - {src: hello.txt, dst: /x/y}\n",
            r"files\[1\]\.dst: \"/x/y\" is a file here but files\[0\] puts entries below it",
        ),
        ("  - {src: hello.txt, dst: /}\n", r"files\[0\]\.dst: / is the root directory"),
        (
            "  - {src: ., dst: /ctx}\n",
            r"files\[0\]\.src: \".\" contains the build output \"out/t.spore\"",
        ),
        ("  - {src: hello.txt, dst: /opt/}\n", r"files\[0\]\.dst: \"/opt/\" ends with '/'"),
    ],
)
def test_conflicting_destinations_are_refused(
    tmp_path: Path, files_yaml: str, problem: str
) -> None:
    make_context(tmp_path)
    with pytest.raises(SporefileError, match=problem):
        layer_for(tmp_path, "files:\n" + files_yaml).plan()


def test_later_entries_win_like_successive_copies(tmp_path: Path) -> None:
    make_context(tmp_path)
    layer = layer_for(
        tmp_path,
        """\
files:
  - {src: app, dst: /app}
  - {src: hello.txt, dst: /app/main.py, mode: "0444"}
""",
    )
    got = members(tar_bytes(layer))
    assert got["app/main.py"].mode == 0o444
    assert got["app/main.py"].size == len("hello from the context\n")


def fake_image() -> ResolvedImage:
    return ResolvedImage(
        None,
        None,
        "sha256:" + "1" * 64,
        "linux/amd64",
        "sha256:" + "2" * 64,
        (LayerDesc("sha256:" + "3" * 64, ociimage.LAYER_MEDIA["gzip"], 10),),
        (),
    )


def test_rootfs_key_without_files_is_unchanged_and_files_change_it(tmp_path: Path) -> None:
    image = fake_image()
    # The key before files: existed, computed the way imagefs.py computed it then.
    before = {
        "domain": "spore/rootfs-key/v1",
        "builder": ROOTFS_BUILDER,
        "e2fsprogs": tool_versions(),
        "epoch": ROOTFS_EPOCH,
        "manifest": image.manifest_digest,
        "layers": [[d.digest, d.media_type] for d in image.layers],
    }
    old = blake3.blake3(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert rootfs_key(image) == rootfs_key(image, files_layer((), tmp_path, tmp_path)) == old
    make_context(tmp_path)
    key = rootfs_key(image, layer_for(tmp_path, APP_FILES))
    assert key != old
    assert rootfs_key(image, layer_for(tmp_path, APP_FILES)) == key  # unchanged: same key
    (tmp_path / "app" / "sub" / "run.sh").write_text("#!/bin/sh\necho edited\n")
    edited = rootfs_key(image, layer_for(tmp_path, APP_FILES))
    os.chmod(tmp_path / "app" / "main.py", 0o644)
    moded = rootfs_key(image, layer_for(tmp_path, APP_FILES))
    (tmp_path / "app" / "new").write_text("")
    added = rootfs_key(image, layer_for(tmp_path, APP_FILES))
    assert len({old, key, edited, moded, added}) == 5


def test_file_changed_during_the_build_fails_closed(tmp_path: Path) -> None:
    make_context(tmp_path)
    layer = layer_for(tmp_path, APP_FILES)
    layer.digest()  # what the rootfs key was computed from
    (tmp_path / "hello.txt").write_text("changed\n")
    with pytest.raises(SporefileError, match="changed during the build"):
        layer.write_file(tmp_path / "files.tar")


# -- through the CLI: `spore build --until rootfs` on an offline busybox layout -------------


def spore(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPORE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "sporevm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = tmp_path_factory.mktemp("busybox") / "layout"
    ociimage.write_layout(layout, list(ociimage.busybox_layers()), tag="latest")
    return layout


def write_sporefile(ctx: Path, image: str, files_yaml: str, steps: str = "") -> Path:
    path = ctx / "Sporefile"
    path.write_text(
        f'sporefile: 1\nname: files\nbase: {{image: "{image}"}}\n'
        "machine: {memory: 256MiB}\n" + files_yaml + steps
    )
    return path


def build_rootfs(home: Path, sf: Path) -> dict[str, object]:
    proc = spore(home, "build", "--json", "--until", "rootfs", str(sf))
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def test_build_copies_files_and_rebuilds_only_on_change(
    tmp_path: Path, busybox_layout: Path
) -> None:
    make_context(tmp_path / "ctx")
    image = f"oci-layout:{busybox_layout}:latest"
    sf = write_sporefile(tmp_path / "ctx", image, APP_FILES)
    home = tmp_path / "home"
    first = build_rootfs(home, sf)
    assert first["tasks"] == {
        "resolve:base": "executed",
        "fetch:base": "executed",
        "rootfs": "executed",
    }
    rootfs = first["rootfs"]
    assert isinstance(rootfs, dict)
    with mounted_ro(Path(rootfs["path"])) as mnt:
        hello = mnt / "opt/app/hello.txt"
        assert hello.read_text() == "hello from the context\n"
        st = hello.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime) == (0o640, 0, ROOTFS_EPOCH)
        assert (mnt / "srv/app/sub/run.sh").stat().st_mode & 0o777 == 0o755
        assert (mnt / "bin/busybox").is_file()  # the image is still there
    again = build_rootfs(home, sf)
    assert set(again["tasks"].values()) == {"up-to-date"}  # type: ignore[attr-defined]
    (tmp_path / "ctx" / "hello.txt").write_text("edited\n")
    edited = build_rootfs(home, sf)
    assert edited["tasks"]["rootfs"] == "executed"  # type: ignore[index]
    assert edited["rootfs"]["digest"] != rootfs["digest"]  # type: ignore[index]
    # Without files: the image's own rootfs, as built by `spore rootfs` (same key, same bytes).
    (tmp_path / "plain").mkdir()
    plain = write_sporefile(tmp_path / "plain", image, "")
    bare = build_rootfs(home, plain)
    out = tmp_path / "bare.ext4"
    proc = spore(home, "rootfs", image, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["digest"] == bare["rootfs"]["digest"]  # type: ignore[index]
    assert bare["rootfs"]["digest"] not in {  # type: ignore[index]
        rootfs["digest"],
        edited["rootfs"]["digest"],  # type: ignore[index]
    }


def test_build_refuses_a_write_through_a_base_image_symlink(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    ociimage.write_layout(layout, [ociimage.tar_layer({"etc": None, "app": "/etc"})], tag="latest")
    make_context(tmp_path / "ctx")
    sf = write_sporefile(
        tmp_path / "ctx",
        f"oci-layout:{layout}:latest",
        "files:\n  - {src: hello.txt, dst: /app/x}\n",
    )
    proc = spore(tmp_path / "home", "build", "--until", "rootfs", str(sf))
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "files[0].dst" in ln]
    assert len(lines) == 1 and "'app' is a symlink" in lines[0], proc.stderr


# -- a real guest ------------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.kernelbuild
def test_a_step_reads_the_copied_file(tmp_path: Path, busybox_layout: Path) -> None:
    from sporevm.build.guest import lookup_guest
    from sporevm.store import Store
    from tests.test_kernel import KERNEL_STORE

    if lookup_guest(Store(KERNEL_STORE)) is None:
        pytest.skip(f"no prebuilt kernel in {KERNEL_STORE} (this test never builds one)")
    token = uuid.uuid4().hex  # fresh content: fresh rootfs, boot and step keys
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "hello.txt").write_text(f"hello {token}\n")
    sf = write_sporefile(
        ctx,
        f"oci-layout:{busybox_layout}:latest",
        'files:\n  - {src: hello.txt, dst: /opt/app/hello.txt, mode: "0640"}\n',
        "steps:\n  - {name: cat, run: [cat, /opt/app/hello.txt]}\n"
        "  - {name: mode, run: [stat, -c, '%a %u', /opt/app/hello.txt]}\n",
    )
    proc = spore(KERNEL_STORE, "build", str(sf))
    assert proc.returncode == 0, proc.stderr
    shown = [ln for ln in proc.stderr.splitlines() if token in ln or "640 0" in ln]
    print("\n".join(shown))
    assert any(f"hello {token}" in ln for ln in shown), proc.stderr  # streamed step output
    assert any(ln.endswith("640 0") for ln in shown), proc.stderr
    again = spore(KERNEL_STORE, "build", "--json", str(sf))  # unchanged: no VM, no work
    assert again.returncode == 0, again.stderr
    assert set(json.loads(again.stdout)["tasks"].values()) == {"up-to-date"}, again.stdout
