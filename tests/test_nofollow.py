"""The one no-follow path walker (sporevm/nofollow.py) and the callers that must use it."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sporevm import nofollow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[int]:
    """root/ a/ b/ f ; a/link -> /etc ; a/file ; a/fifo ; elink -> /etc/passwd"""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"f")
    (tmp_path / "a" / "file").write_bytes(b"x")
    (tmp_path / "a" / "link").symlink_to("/etc")
    os.mkfifo(tmp_path / "a" / "fifo")
    (tmp_path / "elink").symlink_to("/etc/passwd")
    fd = nofollow.open_root(tmp_path)
    try:
        yield fd
    finally:
        os.close(fd)


def test_open_dir_and_file(tree: int) -> None:
    with nofollow.opened_dir(tree, "a/b") as fd:
        assert sorted(os.listdir(fd)) == ["f"]
    with nofollow.opened_dir(tree, (b"a", b"b")) as fd:  # components, as bytes
        assert os.listdir(fd) == ["f"]
    with os.fdopen(nofollow.open_file(tree, ("a", "b", "f")), "rb") as fh:
        assert fh.read() == b"f"
    os.close(nofollow.open_dir(tree, ()))  # no components: the root itself


@pytest.mark.parametrize(
    ("rel", "exc", "where", "symlink"),
    [
        ("a/link/passwd", nofollow.NotADirectoryInPath, "a/link", True),
        ("a/file/x", nofollow.NotADirectoryInPath, "a/file", False),
        ("a/nope/x", nofollow.MissingInPath, "a/nope", None),
        ("a/link", nofollow.NotARegularFile, "a/link", True),
        ("elink", nofollow.NotARegularFile, "elink", True),
        ("a/fifo", nofollow.NotARegularFile, "a/fifo", False),  # refused, without hanging
        ("a/b", nofollow.NotARegularFile, "a/b", False),
    ],
)
def test_open_file_refusals_name_the_component(
    tree: int, rel: str, exc: type[OSError], where: str, symlink: bool | None
) -> None:
    with pytest.raises(exc) as info:
        nofollow.open_file(tree, rel)
    assert getattr(info.value, "rel", None) == where
    if symlink is not None:
        assert getattr(info.value, "symlink", None) is symlink
    if isinstance(info.value, (nofollow.NotADirectoryInPath, nofollow.MissingInPath)):
        assert info.value.depth == where.count("/") + 1


def test_missing_is_a_file_not_found_error(tree: int) -> None:
    with pytest.raises(FileNotFoundError):
        nofollow.open_dir(tree, "nope")


@pytest.mark.parametrize("rel", ["", "a//b", "a/../a", "./a", "/a", ("a", ".."), ("a/b",)])
def test_only_plain_relative_paths(tree: int, rel: str | tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="not a plain relative path"):
        nofollow.open_dir(tree, rel)


def test_walk_is_sorted_and_never_follows(tree: int) -> None:
    seen = [("/".join(e.path), e.is_dir()) for e in nofollow.walk(tree)]
    assert seen == [
        ("a", True),
        ("a/b", True),
        ("a/b/f", False),
        ("a/fifo", False),
        ("a/file", False),
        ("a/link", False),
        ("elink", False),
    ]


def test_walk_refuses_a_directory_swapped_for_a_link(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fd = nofollow.open_root(tmp_path)
    try:
        walker = nofollow.walk(fd)
        assert next(walker).name == "d"
        os.rmdir(tmp_path / "d")
        (tmp_path / "d").symlink_to("/etc")  # swapped after it was listed
        with pytest.raises(nofollow.NotADirectoryInPath):
            next(walker)
    finally:
        os.close(fd)


# The modules that read or build trees a hostile party shaped: none opens a path
# component itself; all go through nofollow.py (creation *at() calls in layers.py stay).
WALKER_USERS = [
    "sporevm/build/oci.py",
    "sporevm/dist/transport_file.py",
    "sporevm/build/fileslayer.py",
    "sporevm/build/layers.py",
]


@pytest.mark.parametrize("path", WALKER_USERS)
def test_callers_have_no_walker_of_their_own(path: str) -> None:
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    imports = {
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "sporevm"
        for a in n.names
    }
    imports |= {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "sporevm.nofollow"
    }
    assert imports & {"nofollow", "sporevm.nofollow"}, f"{path} does not use nofollow.py"
    assert (
        "O_DIRECTORY | os.O_NOFOLLOW" not in source and "O_NOFOLLOW | os.O_DIRECTORY" not in source
    ), f"{path} walks directories itself"


def test_net_is_a_bottom_floor() -> None:
    """build and dist both import sporevm.net, so it imports neither (DESIGN §9)."""
    for path in sorted((ROOT / "sporevm" / "net").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not name.startswith(
                    ("sporevm.build", "sporevm.dist", "sporevm.spore", "sporevm.vmm", "sporevm.cli")
                ), (path.name, name)
